// Schemas of the projected (index-form) holistic-attention operator.
//
// grasp.ops.holistic_attention_projected (grasp/ops/holistic_attention_projected.py) equals
//   holistic_attention(user[user_index], user_sim[user_index], item[item_index], item_sim[item_index]) @ W^T
// with sigmoid gates. W's four d-wide column blocks act on (a_self i, a_sim i_sim, a_glob i, a_glob i_sim),
// so the projection folds into three per-item values, computed once per distinct item by the caller:
//   values[j] = [W0 item[j], W1 item_sim[j], W2 item[j] + W3 item_sim[j]]                  [M, 3, e]
// and the kernels only gate and mix them per (user, item) pair n:
//   s1 = <user[r], item[j]>, s2 = <user_sim[r], item_sim[j]>       (r = user_index[n], j = item_index[n])
//   out[n] = sig(s1/sqrt(d)) values[j,0] + sig(s2/sqrt(d)) values[j,1] + sig((s1+s2)/sqrt(2d)) values[j,2]
//
//   holistic_attention_projected_forward(user [U, d], user_sim, item [M, d], item_sim, values [M, 3, e],
//                      user_index [N], item_index [N]) -> out [N, e]
//   holistic_attention_projected_backward(grad_out [N, e], same inputs)
//       -> (grad_user, grad_user_sim, grad_item, grad_item_sim, grad_values)
//
// Contract shared by every kernel (the Python wrapper guarantees it): all float tensors contiguous, one
// dtype and device; the indices contiguous int64 and in range. Gates are recomputed in the backward, which is
// deterministic on every device (segmented sums over the pairs grouped by item and by user, no atomics).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(grasp, m) {
  m.def(
      "holistic_attention_projected_forward(Tensor user, Tensor user_sim, Tensor item, Tensor item_sim, Tensor values, "
      "Tensor user_index, Tensor item_index) -> Tensor");
  m.def(
      "holistic_attention_projected_backward(Tensor grad_out, Tensor user, Tensor user_sim, Tensor item, Tensor item_sim, "
      "Tensor values, Tensor user_index, Tensor item_index) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
