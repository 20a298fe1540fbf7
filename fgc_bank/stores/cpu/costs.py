"""The search planner's cost model: rough costs of its steps on one thread, in one place.

``search._plan`` chooses between the heap and the threshold strategy, and the threshold's sample
size, by these numbers. They were measured once on the machine the CPU targets were met on (a
2-core AMD EPYC VM; see docs/perf-notes.md); they only steer choices, never answers: every
strategy gives the exact top-k, so a machine where they are off is slower, not wrong.
"""

CANDIDATE_NS = 40.0  # one score that survives the threshold, carried to the final sort
SAMPLE_ROW_NS = 0.6  # one sampled score through the group maximum and topk, beyond its GEMM flops
FLOP_NS = 0.011  # one flop of a single-threaded sgemm
SAMPLE_GROUP = 8  # sample scores per group whose maximum stands for them in the threshold
ENCODE_NS, ENCODE_VALUE_NS = 190_000.0, 9.0  # a prefilter encoding B queries of D values (fixed, per value)
THRESHOLD_SCAN_NS = 0.45  # one score through compare + flatnonzero
RESCORE_NS = 6.0  # one candidate scored again in float32 (faiss.pairwise_indexed_inner_product)
HEAP_SCAN_NS = 0.3  # one score through a FAISS heap's compare
HEAP_INSERT_NS, HEAP_LEVEL_NS = 10.0, 6.0  # one heap insertion: fixed + per level of the heap
