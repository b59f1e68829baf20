// Schemas of the top-k neighbour operator's kernels (docs/design.md section 4).
//
// The public function grasp.ops.topk_neighbor_mean (grasp/ops/topk_neighbor_mean.py) validates,
// normalises (cosine), blocks the queries and rescores the "fast" candidates;
// the kernels in cpu/ and cuda/ implement these two steps:
//
//   topk_neighbor_mean_search(queries [q, D], db [n, D], k, query_start, exclude_self)
//       -> (scores float32 [q, k] descending, indices int64 [q, k]; ties -> smaller index)
//       query row r never selects db row query_start + r when exclude_self.
//   topk_neighbor_mean_gather(x [n, D], indices [q, k]) -> [q, D]: mean of x[indices[r]], x's dtype.
//
// No autograd: neighbour search is an offline step. No autocast either: topk_neighbor_mean_search
// excludes autocast inside, so its products keep the inputs' precision under an
// enclosing torch.autocast, and topk_neighbor_mean_gather always accumulates in float32
// (float64 for float64) and returns x's dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(grasp, m) {
  m.def(
      "topk_neighbor_mean_search(Tensor queries, Tensor db, int k, int query_start, bool exclude_self) -> (Tensor, Tensor)");
  m.def("topk_neighbor_mean_gather(Tensor x, Tensor indices) -> Tensor");
}
