"""KV memory: the dense preallocated cache, and the paged and streaming pools of sparse decoding."""
