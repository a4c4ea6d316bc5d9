"""The command line: a thin layer over the library (every command is one call a user can import)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from latentrag.assets import DEFAULT_CORPUS, DEFAULT_ENCODER
from latentrag.defaults import PASSAGE_WORDS
from latentrag.errors import LatentRagError, LatentRagWarning

# latentrag.rag_types.MODES, spelled out so that parsing arguments imports no torch (a test keeps them equal)
MODES = ("token", "sequence", "concat", "fid")
MODE_HELP = ("token (RAG-Token), sequence (RAG-Sequence), concat (all k passages in one input) or fid "
             "(Fusion-in-Decoder, seq2seq generators); default: the model's, token for the bundled models")

SAMPLE_QUESTIONS = [
    "Who directed the film 2001: A Space Odyssey?",
    "What is the largest planet in the Solar System?",
    "Which element has the chemical symbol Fe?",
]


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Our warnings as one plain line (like our errors); everything else as Python shows it."""
    if issubclass(category, LatentRagWarning):
        print(f"latentrag: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def load_model(args) -> object:
    """The model `ask`, `eval` and `demo` use: `loading.load_model` with --model, --index, --ray, --address."""
    from latentrag.loading import load_model as load

    return load(getattr(args, "model", None), getattr(args, "index", None), ray=getattr(args, "ray", False),
                address=getattr(args, "address", None), document_encoder=getattr(args, "document_encoder", None),
                device=getattr(args, "device", None))


# ---- commands ---------------------------------------------------------------------------------------
def cmd_index_build(args) -> int:
    from latentrag.retrieval.index import build_corpus_index

    if args.ray:
        from latentrag.distributed.encoding import build_corpus_sharded_index

        report = build_corpus_sharded_index(
            args.corpus, args.out, args.shards, index_type=args.index_type, passage_words=args.passage_words,
            encoder=args.encoder, batch_size=args.batch_size, progress=not args.quiet, resume=args.resume,
            chunk_size=args.chunk_size, exact_vectors=args.exact_vectors, address=args.address,
            workers=args.workers, num_cpus=args.cpus_per_worker, threads=args.threads or 1,
        )
        print(f"built {report.shards} {args.index_type} shards of {report.passages} passages in {report.directory} "
              f"({report.encoded_blocks} blocks encoded, {report.reused_blocks} reused)", file=sys.stderr)
        return 0
    index = build_corpus_index(
        args.corpus, args.out, index_type=args.index_type, passage_words=args.passage_words, encoder=args.encoder,
        batch_size=args.batch_size, progress=not args.quiet, resume=args.resume, chunk_size=args.chunk_size,
        exact_vectors=args.exact_vectors,
    )
    print(f"built {index.manifest.index_type} index of {len(index)} passages (dim {index.dim}) in "
          f"{index.directory}", file=sys.stderr)
    return 0


def cmd_index_add(args) -> int:
    from latentrag.retrieval.index import add_corpus_to_index

    index, added = add_corpus_to_index(args.directory, args.corpus, encoder=args.encoder,
                                       passage_words=args.passage_words, batch_size=args.batch_size,
                                       progress=not args.quiet)
    print(f"added {added} passages to {args.directory} (now {len(index)})", file=sys.stderr)
    return 0


def cmd_index_import(args) -> int:
    """Published vectors (DPR shards + psgs_w100.tsv, or a Hugging Face datasets folder) -> an index."""
    from latentrag.retrieval.index.importers import IMPORT_CHUNK_SIZE, import_index

    index = import_index(args.out, args.encoder_name, dpr_embeddings=args.dpr_embeddings, passages=args.passages,
                         hf_dataset=args.hf_dataset, load_encoder=not args.no_load_encoder,
                         index_type=args.index_type, exact_vectors=args.exact_vectors, resume=args.resume,
                         chunk_size=args.chunk_size or IMPORT_CHUNK_SIZE, progress=not args.quiet)
    named = index.manifest.encoder.get("verified", True)
    note = "" if named else " (encoder recorded by name only: its weights were not loaded)"
    print(f"imported {index.manifest.index_type} index of {len(index)} passages (dim {index.dim}) into {args.out}"
          f"{note}", file=sys.stderr)
    return 0


def cmd_index_info(args) -> int:
    from latentrag.distributed.sharded import is_sharded, sharded_info
    from latentrag.retrieval.index import index_info

    if is_sharded(args.directory):  # the top-level manifest and each shard's rows, as JSON
        print(json.dumps(sharded_info(args.directory), indent=2))
        return 0
    info = index_info(args.directory)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key in ("directory", "index_type", "factory", "count", "dim", "params", "exact_vectors", "corpus",
                    "version", "total_bytes"):
            print(f"{key:14} {info[key]}")
        print(f"{'encoder':14} {info['encoder'].get('name')} (sha256 {str(info['encoder'].get('sha256'))[:16]}…)")
    return 0


def cmd_index_plan(args) -> int:
    from latentrag.retrieval.index_plan import format_plan, plan

    result = plan(args.passages, args.dim, types=args.index_type or None, exact_vectors=args.exact_vectors)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def cmd_ask(args) -> int:
    from latentrag.generation.decoding import DecodeOptions

    if args.max_new_tokens is not None:
        DecodeOptions(max_new_tokens=args.max_new_tokens).check()  # before the model loads
    model = load_model(args)
    answers = model.generate([args.question], mode=args.mode, decoding=args.decoding, num_beams=args.beams,
                             k=args.k, max_new_tokens=args.max_new_tokens)
    answer = answers[0]
    if args.json:
        print(json.dumps(answer.to_json(), indent=2, ensure_ascii=False))
        return 0
    print(f"Q: {answer.question}\nA: {answer.text}\n")
    if answer.evidence:  # p(z|x,y): which passage the whole answer came from (marginals.answer_posterior)
        evidence, label = answer.evidence, "p(z|x,y)"
    elif answer.mode == "token":  # RAG-Token without per-passage likelihoods: p(z|x,y_≤i) averaged over tokens
        rows = answer.posterior or [[0.0] * len(answer.passages)]
        evidence = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
        label = "avg p(z|x,y_≤i)"
    else:  # concat, fid: every passage read at once, no posterior over them
        evidence, label = [None] * len(answer.passages), None
        print("(all passages read at once: no posterior over them; p(z|x) is the retriever's ranking)\n")
    for rank, (p, prob, post) in enumerate(zip(answer.passages, answer.doc_probs, evidence, strict=True), start=1):
        snippet = p.text if len(p.text) <= 160 else p.text[:157] + "..."
        shown = "" if label is None else f"  {label}={post:.3f}"
        print(f"  [{rank}] p(z|x)={prob:.3f}{shown}  {p.title}: {snippet}")
    return 0


def cmd_worked_examples(args) -> int:
    from latentrag.evaluation.worked_examples import render_text, worked_examples

    results = worked_examples()
    print(json.dumps(results, indent=2) if args.json else render_text(results))
    return 0


def cmd_eval(args) -> int:
    """Evaluate (or, with --predictions, re-score) on a QA data set; one run per --k value."""
    from latentrag.evaluation.datasets import load_dataset
    from latentrag.evaluation.evaluate import EvalSettings, default_run_dir, evaluate_sweep, rescore

    if args.predictions:
        result = rescore(args.predictions, args.out)
        print(json.dumps(result["metrics"], indent=2))
        return 0
    if not args.dataset:
        raise LatentRagError("give --dataset NAME|PATH.jsonl to evaluate, or --predictions FILE to re-score")
    if args.ray and args.answerable_only:
        raise LatentRagError("--answerable-only scans every passage in this process: filter without --ray, "
                             "or evaluate on all questions with --ray")
    runs = [
        EvalSettings(
            dataset=args.dataset, mode=args.mode, decoding=args.decoding, num_beams=args.beams, k=k,
            closed_book=args.closed_book, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            answerable_only=args.answerable_only, limit=args.limit,
        )
        for k in args.k or [None]  # None here and below: the model's (its RagConfig)
    ]  # settings are checked before the model loads, and so is the data:
    load_dataset(args.dataset)
    model = load_model(args)
    runs = [run.resolved(model.config) for run in runs]
    base = Path(args.out) if args.out else default_run_dir(runs[0])
    results = evaluate_sweep(model, runs, base, resume=args.resume)
    for run, result in zip(runs, results, strict=True):
        out = base if len(runs) == 1 else base / f"k{run.k}"
        print(f"{result['label']}: wrote {out}/metrics.json and {out}/report.md", file=sys.stderr)
    if len(runs) > 1:
        print(f"comparison over k: {base}/report.md", file=sys.stderr)
    print(json.dumps({r["label"]: r["metrics"] for r in results}, indent=2))
    return 0


def cmd_serve(args) -> int:
    """Run the HTTP service (FastAPI under uvicorn) over the model and an index under the indexes root."""
    import uvicorn

    from latentrag.serving import create_app
    from latentrag.serving.admission import Limits
    from latentrag.serving.loader import load_service

    given = {"max_cost": args.max_cost, "max_queue": args.max_queue, "max_pending_cost": args.max_pending_cost,
             "timeout_s": args.request_timeout, "grace_s": args.grace}
    limits = Limits(**{key: value for key, value in given.items() if value is not None})
    service = load_service(args.model, args.index, args.indexes_root, args.max_batch, args.max_wait_ms,
                           ray=args.ray, address=args.address, document_encoder=args.document_encoder,
                           limits=limits)
    # SIGTERM: stop accepting, let requests in flight finish for at most --grace s, then stop the rest
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=limits.grace_s)
    if service.batcher.busy:  # a decoding step still running after the grace period: do not wait for it
        print("latentrag serve: a batch was still running after the grace period; exiting without it",
              file=sys.stderr)
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_demo(args) -> int:
    model = load_model(args)
    for answer in model.generate(SAMPLE_QUESTIONS, decoding="greedy"):  # as the model was trained (mode, k)
        print(f"Q: {answer.question}\nA: {answer.text}")
        evidence = answer.evidence or [None] * len(answer.passages)  # p(z|x,y): where the answer came from
        for p, prob, post in zip(answer.passages[:3], answer.doc_probs[:3], evidence[:3], strict=True):
            print(f"   p(z|x)={prob:.3f}" + ("" if post is None else f"  p(z|x,y)={post:.3f}") + f"  {p.title}")
        print()
    return 0


def cmd_train(args) -> int:
    """Fine-tune end to end (see `latentrag.training`); prints the trained model's folder."""
    from latentrag.training import TrainSettings, train
    from latentrag.training.trainer import settings_from

    resume = args.resume
    values = {key.replace("-", "_"): value for key, value in vars(args).items()}
    settings: TrainSettings = settings_from(values)
    model_dir = train(settings, resume=resume, progress=not args.quiet)
    print(model_dir)
    return 0


def cmd_export(args) -> int:
    """A saved model from one checkpoint of a training run."""
    from latentrag.training.trainer import export_checkpoint

    print(export_checkpoint(args.run, args.out, args.step))
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """What `load_model` takes, for every command that answers: index, model, Ray, device, document tower."""
    parser.add_argument("--index", default=None, help="index folder (default: bundled wiki-leads)")
    parser.add_argument("--model", default=None,
                        help="a saved RagModel or Hugging Face RAG checkpoint folder/hub name; 'base': the bundled "
                             "models untrained (default: the shipped fine-tuned model)")
    parser.add_argument("--ray", action="store_true", help="search a sharded --index with one Ray actor per shard")
    parser.add_argument("--address", default=None, help="with --ray: 'auto' or HOST:PORT (default: a local cluster)")
    parser.add_argument("--device", default=None, help="torch device for the towers and generator, e.g. cuda")
    parser.add_argument("--document-encoder", default=None,
                        help="HF RAG checkpoints: the tower the index's vectors came from "
                             "(default facebook/dpr-ctx_encoder-single-nq-base)")


# ---- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentrag", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: cores owned)")
    sub = parser.add_subparsers(dest="command", required=True)

    index = sub.add_parser("index", help="build and inspect dense indexes").add_subparsers(dest="index_command",
                                                                                            required=True)
    build = index.add_parser("build", help="encode a corpus into an index folder")
    from latentrag.retrieval.index import CHUNK_SIZE
    from latentrag.retrieval.index_plan import INDEX_TYPES

    corpus_help = "'wiki-leads', a .jsonl/.tsv/.csv file, or a folder of .txt/.md files"
    build.add_argument("--corpus", default=DEFAULT_CORPUS, help=corpus_help)
    build.add_argument("--out", default=None,
                       help="index folder (default: the cache, CACHE/indexes/CORPUS-ENCODER-TYPE)")
    build.add_argument("--index-type", default="flat", choices=list(INDEX_TYPES))
    build.add_argument("--passage-words", type=int, default=PASSAGE_WORDS)
    build.add_argument("--encoder", default=DEFAULT_ENCODER, help="document tower (default: bundled MiniLM)")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="passages encoded per saved chunk")
    build.add_argument("--resume", action="store_true", help="continue an interrupted build from its last chunk")
    build.add_argument("--exact-vectors", action=argparse.BooleanOptionalAction, default=None,
                       help="keep exact float32 vectors (default: only for sq8/pq types)")
    build.add_argument("--quiet", action="store_true")
    build.add_argument("--ray", action="store_true",
                       help="encode on a Ray cluster (ray.data, encoder actors) into --shards index shards")
    build.add_argument("--address", default=None, help="with --ray: 'auto' or HOST:PORT (default: a local cluster)")
    build.add_argument("--shards", type=int, default=1, help="with --ray: number of index shards")
    build.add_argument("--workers", type=int, default=2, help="with --ray: encoder actors")
    build.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --ray: CPUs each actor requests")
    build.set_defaults(func=cmd_index_build)

    add = index.add_parser("add", help="append passages from a corpus to an index")
    add.add_argument("directory")
    add.add_argument("--corpus", required=True, help=corpus_help)
    add.add_argument("--passage-words", type=int, default=None, help="default: as the index was built")
    add.add_argument("--encoder", default=None, help="default: the encoder named in the manifest")
    add.add_argument("--batch-size", type=int, default=64)
    add.add_argument("--quiet", action="store_true")
    add.set_defaults(func=cmd_index_add)

    imp = index.add_parser("import", help="an index from published vectors (DPR shards or a HF dataset), no encoding")
    imp.add_argument("--dpr-embeddings", default=None, help="glob of DPR's wikipedia_passages_*.pkl shards")
    imp.add_argument("--passages", default=None, help="DPR's psgs_w100.tsv (id, text, title) for --dpr-embeddings")
    imp.add_argument("--hf-dataset", default=None,
                     help="a datasets save_to_disk folder or .arrow file with title, text, embeddings")
    imp.add_argument("--out", required=True, help="index folder")
    imp.add_argument("--encoder-name", required=True,
                     help="the document tower the vectors came from, e.g. facebook/dpr-ctx_encoder-single-nq-base")
    imp.add_argument("--no-load-encoder", action="store_true",
                     help="record the encoder by name only (do not load its weights to fingerprint them)")
    imp.add_argument("--index-type", default="flat", choices=list(INDEX_TYPES))
    imp.add_argument("--chunk-size", type=int, default=None, help="vectors per saved chunk (default 65536)")
    imp.add_argument("--resume", action="store_true", help="continue an interrupted import")
    imp.add_argument("--exact-vectors", action=argparse.BooleanOptionalAction, default=None,
                     help="keep exact float32 vectors (default: only for sq8/pq types)")
    imp.add_argument("--quiet", action="store_true")
    imp.set_defaults(func=cmd_index_import)

    info = index.add_parser("info", help="print an index's manifest and counts")
    info.add_argument("directory")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_index_info)

    plan = index.add_parser("plan", help="memory each index type needs for N passages of D dimensions")
    plan.add_argument("--passages", type=int, required=True)
    plan.add_argument("--dim", type=int, required=True)
    plan.add_argument("--index-type", action="append", choices=list(INDEX_TYPES), help="(repeatable) default: all")
    plan.add_argument("--exact-vectors", action=argparse.BooleanOptionalAction, default=True)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_index_plan)

    ask = sub.add_parser("ask", help="answer a question and show the passages it came from")
    ask.add_argument("question")
    ask.add_argument("--mode", choices=MODES, default=None, help=MODE_HELP)
    ask.add_argument("--decoding", choices=["greedy", "beam", "thorough", "fast"], default=None,
                     help="token, concat, fid: greedy (default) | beam; sequence: thorough (default) | fast")
    ask.add_argument("--beams", type=int, default=None,
                     help="beam size (default: 1 for greedy, else the model's num_beams, 4 for the bundled models)")
    ask.add_argument("--k", type=int, default=None,
                     help="passages retrieved and marginalised over (default: the model's, 5 for the bundled models)")
    ask.add_argument("--max-new-tokens", type=int, default=None,
                     help="answer length limit (default: the model's, 32 for the bundled models)")
    _model_arguments(ask)
    ask.add_argument("--json", action="store_true")
    ask.set_defaults(func=cmd_ask)

    worked = sub.add_parser("worked-examples", help="recompute every number of the course seed")
    worked.add_argument("--json", action="store_true")
    worked.set_defaults(func=cmd_worked_examples)

    serve = sub.add_parser("serve", help="serve the API and the web page (FastAPI + uvicorn); see docs/serving.md")
    serve.add_argument("--model", default=None, help="a saved RagModel folder (default: trained, else bundled)")
    serve.add_argument("--index", default=None, help="index name under --indexes-root (default: bundled)")
    serve.add_argument("--indexes-root", default=None, help="folder of index folders (default: the cache's)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="requests per micro-batch at most")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for company")
    serve.add_argument("--max-cost", type=int, default=None, help="cost bound per request (default 16000), "
                       "cost = k·(256 + beams·max_new_tokens·(1+k if thorough else 1)); above it: 422")
    serve.add_argument("--max-queue", type=int, default=None,
                       help="requests waiting at most (default 64); one more: 429 with Retry-After")
    serve.add_argument("--max-pending-cost", type=int, default=None,
                       help="summed cost of the requests waiting and running (default --max-cost); above: 503")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help="seconds from a request's arrival to its answer (default 120); then it is dropped: 503")
    serve.add_argument("--grace", type=float, default=None, help="on SIGTERM, seconds the requests in flight "
                       "may take to finish (default 10) before they are stopped")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--ray", action="store_true", help="serve sharded indexes, one Ray actor per shard")
    serve.add_argument("--address", default=None, help="with --ray: 'auto' or HOST:PORT (default: a local cluster)")
    serve.add_argument("--document-encoder", default=None,
                       help="for a Hugging Face RAG checkpoint: the tower that made the index's vectors")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="build the default index if missing and answer three questions")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="evaluate on a QA data set (EM, F1, recall@k, BLEU, ...) or re-score")
    ev.add_argument("--dataset", default=None, help="nq-test, trivia-test, wq-test, curated-test, ... or a .jsonl")
    ev.add_argument("--predictions", default=None, help="re-score this predictions.jsonl without generating")
    ev.add_argument("--answerable-only", action="store_true",
                    help="keep questions with a gold answer in some passage of the index")
    ev.add_argument("--limit", type=int, default=None, help="first N questions (after the answerable filter)")
    ev.add_argument("--mode", choices=MODES, default=None, help=MODE_HELP)
    ev.add_argument("--decoding", default=None,
                    help="greedy|beam (token, concat, fid; default greedy), thorough|fast (sequence, default thorough)")
    ev.add_argument("--beams", type=int, default=None,
                    help="beams (default: 1 for greedy, else the model's num_beams, 4 for the bundled models)")
    ev.add_argument("--k", type=int, nargs="+", default=None,
                    help="passages per question; several = a sweep (default: the model's, 5 for the bundled models)")
    ev.add_argument("--closed-book", action="store_true", help="the generator alone, no retrieval")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="answer length limit (default: the model's, 32 for the bundled models)")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--out", default=None, help="run folder (default: eval-runs/DATASET-MODE)")
    ev.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _model_arguments(ev)
    ev.set_defaults(func=cmd_eval)

    tr = sub.add_parser("train", help="fine-tune the query tower and the generator end to end (paper §2.4)")
    tr.add_argument("--train", required=True, help="nq-dev,trivia-dev (comma-separated) or a .jsonl of questions")
    tr.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, learning_curve.png, model/")
    tr.add_argument("--mode", choices=MODES, default="token",
                    help="token (RAG-Token, default), sequence (RAG-Sequence), concat or fid (all k passages read "
                         "at once: no gradient reaches the query tower, which stays frozen)")
    tr.add_argument("--k", type=int, default=5, help="passages retrieved and marginalised over per question")
    length = tr.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimiser steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training data (default 1)")
    tr.add_argument("--batch-size", type=int, default=4, help="questions per micro-batch per process")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4 LoRA, 3e-5 full)")
    tr.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 6%% of the steps)")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--max-grad-norm", type=float, default=1.0)
    tr.add_argument("--label-smoothing", type=float, default=None)
    tr.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the generator; 0 = full fine-tuning")
    tr.add_argument("--query-lora-rank", type=int, default=None,
                    help="LoRA rank of the query tower (default: --lora-rank); 0 = train it fully")
    tr.add_argument("--freeze-query-encoder", action="store_true", help="the paper's frozen-retriever ablation")
    tr.add_argument("--retrieval-scale", type=float, default=None,
                    help="s in p(z|x) ∝ exp(s·d(z)ᵀq(x)) to start from (default: the model's, 1 = the paper's)")
    tr.add_argument("--learn-retrieval-scale", action="store_true", help="train s (log-parameterised)")
    tr.add_argument("--scale-lr", type=float, default=None,
                    help="learning rate of log s (default: the generator's); e.g. 1e-2 lets s move")
    tr.add_argument("--reading-filter", action="store_true",
                    help="train only on questions whose gold answer is in the k passages read at that step")
    tr.add_argument("--counterfactual", type=float, default=0.0, metavar="SHARE",
                    help="share of the questions read with their answer whose passages are rewritten to a "
                         "same-type substitute, the substitute being the target (default 0)")
    tr.add_argument("--rescore-counterfactuals", action="store_true",
                    help="re-encode the rewritten passages with the document tower and score them, as an index "
                         "holding them would (default: they keep the original passages' scores)")
    tr.add_argument("--gold-within", type=int, default=None, metavar="N",
                    help="a question whose k passages hold no gold answer reads its best passage that does among "
                         "the first N instead of its k-th (off by default: the paper reads the top k)")
    tr.add_argument("--target", choices=["stated", "first"], default="stated",
                    help="the answer trained toward: 'stated' = a gold answer the index states, as the passages "
                         "read write it (default); 'first' = the first listed (Hugging Face's scripts; DPR's "
                         "TriviaQA lists aliases such as '🚁' first)")
    tr.add_argument("--closed-book", action="store_true", help="train the generator alone, no retrieval")
    tr.add_argument("--answerable-only", action="store_true",
                    help="keep questions with a gold answer in some passage of the index")
    val = tr.add_mutually_exclusive_group()
    val.add_argument("--val", default=None, help="held-out questions (a file or split name)")
    val.add_argument("--val-fraction", type=float, default=0.02, help="hold out this fraction of --train")
    tr.add_argument("--val-questions", type=int, default=100, help="validation questions per evaluation")
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--save-every", type=int, default=100)
    tr.add_argument("--keep-checkpoints", type=int, default=2)
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="bf16 autocast (default on CUDA) or fp32 (default on CPU)")
    tr.add_argument("--max-new-tokens", type=int, default=16, help="validation answers' length limit")
    tr.add_argument("--model", default=None,
                    help="start from a saved RagModel folder or a Hugging Face RAG checkpoint (folder or hub name)")
    tr.add_argument("--index", default=None, help="index folder (default: bundled wiki-leads)")
    tr.add_argument("--query-encoder", default=None, help="query tower to start from (default: bundled MiniLM)")
    tr.add_argument("--document-encoder", default=None,
                    help="the index's document tower (default: bundled MiniLM; with --model, for a Hugging Face RAG "
                         "checkpoint only)")
    tr.add_argument("--generator", default=None, help="generator to start from (default: bundled SmolLM2)")
    tr.add_argument("--max-input-length", type=int, default=None, help="generator input tokens")
    tr.add_argument("--prompt", choices=["full", "compact"], default=None,
                    help="a decoder-only generator's prompt: full (chat template, default system prompt, "
                         "instruction) or compact (no instruction, empty system turn: fewer tokens per passage)")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help="a saved model from one checkpoint of a training run")
    ex.add_argument("run", help="the run folder (`train --out`)")
    ex.add_argument("--out", required=True, help="model folder to write")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ex.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        if args.command != "worked-examples":
            from latentrag.threads import configure_threads

            configure_threads(args.threads)
            _quiet_transformers()
        return args.func(args)
    except LatentRagError as e:
        print(f"latentrag: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentrag: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
