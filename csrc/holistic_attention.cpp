// Schemas of the holistic-attention operator (docs/design.md section 2).
//
// The kernels live in cpu/ and cuda/; autograd and the fake (meta) kernels are
// registered from Python in grasp/ops/holistic_attention.py.
//
//   holistic_attention_forward(user, user_sim, item, item_sim, mask, softmax) -> out [B, L, 4d]
//   holistic_attention_backward(grad_out, user, user_sim, item, item_sim, mask, softmax)
//       -> (grad_user, grad_user_sim, grad_item, grad_item_sim)
//
// Contract shared by every kernel (the Python wrapper guarantees it):
//   item, item_sim: [B, L, d] contiguous; user, user_sim: [B, d] (broadcast
//   over L) or [B, L, d], contiguous; all four the same floating dtype and
//   device; mask: None or a contiguous bool [B, L] (true = real position).
//   Gates are recomputed in the backward; nothing but the inputs is saved.
#include <torch/library.h>

TORCH_LIBRARY(grasp, m) {
  m.def(
      "holistic_attention_forward(Tensor user, Tensor user_sim, Tensor item, Tensor item_sim, "
      "Tensor? mask, bool softmax) -> Tensor");
  m.def(
      "holistic_attention_backward(Tensor grad_out, Tensor user, Tensor user_sim, Tensor item, "
      "Tensor item_sim, Tensor? mask, bool softmax) -> (Tensor, Tensor, Tensor, Tensor)");
}
