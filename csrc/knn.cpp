// Schemas of the top-k neighbour operator's kernels (DESIGN.md section 3).
//
// The public function grasp.ops.topk_neighbor_mean (grasp/ops/knn.py) validates,
// normalises (cosine), blocks the queries and rescores the "fast" candidates;
// the kernels in cpu/ and cuda/ implement these two steps:
//
//   knn_search(queries [q, D], db [n, D], k, query_start, exclude_self)
//       -> (scores float32 [q, k] descending, indices int64 [q, k]; ties -> smaller index)
//       query row r never selects db row query_start + r when exclude_self.
//   gather_mean(x [n, D], indices [q, k]) -> [q, D]: mean of x[indices[r]], x's dtype.
//
// No autograd: neighbour search is an offline step. No autocast either: knn_search
// excludes autocast inside, so its products keep the inputs' precision under an
// enclosing torch.autocast, and gather_mean always accumulates in float32
// (float64 for float64) and returns x's dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(grasp, m) {
  m.def(
      "knn_search(Tensor queries, Tensor db, int k, int query_start, bool exclude_self) -> (Tensor, Tensor)");
  m.def("gather_mean(Tensor x, Tensor indices) -> Tensor");
}
