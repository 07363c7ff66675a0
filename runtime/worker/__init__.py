"""Everything on the device, one ``Worker`` per GPU rank (model, KV pool, token pool, staging, CUDA
graphs, swapper), and the executors that run the engine's batches on it."""
