"""Generation: the generator p_θ(y_i|x,z,y_<i) behind one interface, shared-context attention, decoding."""
