"""Scale-out on Ray (optional extra `latentrag[ray]`): as Hugging Face's `RagRayDistributedRetriever`.

`cluster` (connecting to or starting Ray), `sharded` (an index split into shards, one Ray actor each,
searched by fan-out and an exact top-k merge), `encoding` (a `ray.data` pipeline that encodes a corpus
into such shards). Importing this package does not import Ray; its modules do.
"""
