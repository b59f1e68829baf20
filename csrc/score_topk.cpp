// Schemas of the score-and-select operator's kernels (docs/design.md section 11).
//
// The public function grasp.ops.score_topk (grasp/ops/score_topk.py) validates the inputs and makes them
// contiguous; the kernels in cpu/ and cuda/ return, for every user b, the k rows j of the item table with
// the largest score s[b, j], without storing the [B, M] scores:
//
//   score_topk_dot(query [B, d], table [M, d], exclude [B, X] or None, k)
//       s[b, j] = <query[b], table[j]>
//   score_topk_gated(query, table, user [B, c], user_sim [B, c], item [M, c], item_sim [M, c],
//                    values [M, 3, e], bias [e], out_query [B, e], exclude, k)
//       s1 = <user[b], item[j]>, s2 = <user_sim[b], item_sim[j]>,
//       h = sig(s1/sqrt(c)) values[j,0] + sig(s2/sqrt(c)) values[j,1] + sig((s1+s2)/sqrt(2c)) values[j,2] + bias
//       s[b, j] = <query[b], table[j]> + <out_query[b], gelu(h)>          (gelu: the exact erf GELU)
//   -> (scores float32 [B, k] descending, indices int64 [B, k]; equal scores -> smaller index)
//
// Contract shared by every kernel (the Python wrapper guarantees it): float tensors contiguous, of one
// dtype and device; exclude contiguous int64 with entries in [-1, M); 1 <= k <= M. Row exclude[b, x] >= 0
// is never returned for user b (-1: padding; duplicates allowed), nor is a row whose score is not above
// -inf (NaN, or an overflow); slots beyond the rows that remain hold (-inf, -1). Scores accumulate in
// float32 (float64 for float64 inputs). No autograd (inference); autocast is ignored.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(grasp, m) {
  m.def("score_topk_dot(Tensor query, Tensor table, Tensor? exclude, int k) -> (Tensor, Tensor)");
  m.def(
      "score_topk_gated(Tensor query, Tensor table, Tensor user, Tensor user_sim, Tensor item, Tensor item_sim, "
      "Tensor values, Tensor bias, Tensor out_query, Tensor? exclude, int k) -> (Tensor, Tensor)");
}
