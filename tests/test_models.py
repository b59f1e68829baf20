"""grasp.models: backbones x item representations, losses, scoring and build_model's checks."""

from __future__ import annotations

import functools
import importlib
import itertools

import numpy as np
import pytest
import torch
from _support import random_llm_tables

import grasp.models.item_encoders as item_encoders
from grasp.models import BACKBONES, MODELS, build_model
from grasp.models.item_encoders import pca_embedding
from grasp.ops import holistic_attention_reference
from grasp.ops.holistic_attention_projected import backend_reason as projected_backend_reason
from grasp.pipeline.tables import Tables

NUM_USERS, NUM_ITEMS, DIM = 12, 40, 24
SMALL = {"d": 16, "max_len": 8, "num_heads": 2}
COMBINATIONS = list(itertools.product(BACKBONES, MODELS))


def random_tables(num_users: int = NUM_USERS, num_items: int = NUM_ITEMS, dim: int = DIM) -> Tables:
    return random_llm_tables(num_users, num_items, dim)


def make(backbone: str, model: str, tables: Tables | None = None, **kwargs) -> torch.nn.Module:
    options = SMALL | kwargs
    tables = random_tables() if tables is None else tables
    return build_model(backbone, model, num_users=NUM_USERS, num_items=NUM_ITEMS, tables=tables, **options)


def batch(batch_size: int = 6, length: int = 9, min_real: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Users, left-padded sequences (every row keeps at least ``min_real`` items) and negatives."""
    users = torch.randint(1, NUM_USERS + 1, (batch_size,))
    seqs = torch.randint(1, NUM_ITEMS + 1, (batch_size, length))
    real = torch.randint(min_real, length + 1, (batch_size,))
    seqs[torch.arange(length) < (length - real).unsqueeze(1)] = 0
    negatives = torch.randint(1, NUM_ITEMS + 1, seqs.shape) * (seqs > 0)
    return users, seqs, negatives


@pytest.mark.parametrize(("backbone", "model"), COMBINATIONS)
def test_loss_is_finite_and_trains_the_right_parameters(backbone, model):
    net = make(backbone, model, mask_prob=0.5)
    users, seqs, negatives = batch(length=9, min_real=6)
    loss = net.loss(users, seqs, negatives)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    params = dict(net.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert params["encoder.embedding.weight"].grad.abs().sum() > 0
    trained = {"grasp": ("user_adapter", "item_adapter", "mlp"), "llmesr": ("encoder.adapter",)}.get(model, ())
    for part in trained:
        assert all(p.grad.abs().sum() > 0 for name, p in params.items() if part in name), part
    # the frozen LLM tables are buffers: no gradient, not in parameters(), not in the state dict
    frozen = [name for name, b in net.named_buffers() if b.is_floating_point() and b.shape[-1] == DIM]
    assert len(frozen) == {"grasp": 4, "llmesr": 1}.get(model, 0)
    assert not any(name in params or name in net.state_dict() for name in frozen)
    assert all(b.grad is None for b in net.buffers())


@pytest.mark.parametrize(("backbone", "model"), COMBINATIONS)
def test_score_shapes_and_score_all_agree_with_score(backbone, model):
    net = make(backbone, model).eval()
    users, seqs, _ = batch(length=8)
    candidates = torch.randint(1, NUM_ITEMS + 1, (len(users), 11))
    with torch.no_grad():
        scores = net.score(users, seqs, candidates)
        all_scores = net.score_all(users, seqs)
    assert scores.shape == candidates.shape and all_scores.shape == (len(users), NUM_ITEMS + 1)
    assert torch.isneginf(all_scores[:, 0]).all() and torch.isfinite(all_scores[:, 1:]).all()
    torch.testing.assert_close(all_scores.gather(1, candidates), scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])  # fused / unfused (softmax renormalised per chunk)
def test_grasp_score_all_chunks_over_items(monkeypatch, activation):
    net = make("sasrec", "grasp", activation=activation).eval()
    users, seqs, _ = batch(length=8)
    width = SMALL["d"] if net.encoder.enhancer.fused(users.device) else 4 * SMALL["d"]
    assert (width == SMALL["d"]) == (activation == "sigmoid")
    monkeypatch.setattr(item_encoders, "_CHUNK_ELEMENTS", len(users) * width * 3)  # 3 items per chunk
    with torch.no_grad():
        expected = net.score(users, seqs, torch.arange(1, NUM_ITEMS + 1).expand(len(users), -1))
        torch.testing.assert_close(net.score_all(users, seqs)[:, 1:], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("backbone", "model"), [("sasrec", "id"), ("sasrec", "grasp"), ("gru4rec", "llmesr")])
def test_causal_backbones_do_not_look_ahead(backbone, model):
    net = make(backbone, model).eval()
    users, seqs, _ = batch(length=8, min_real=8)
    changed = seqs.clone()
    changed[:, 5] = changed[:, 5] % NUM_ITEMS + 1
    with torch.no_grad():
        before, after = net.hidden(users, seqs), net.hidden(users, changed)
    torch.testing.assert_close(after[:, :5], before[:, :5])
    assert not torch.allclose(after[:, 5:], before[:, 5:])


def test_bert4rec_is_bidirectional():
    net = make("bert4rec", "id").eval()
    users, seqs, _ = batch(length=8, min_real=8)
    changed = seqs.clone()
    changed[:, 5] = changed[:, 5] % NUM_ITEMS + 1
    with torch.no_grad():
        assert not torch.allclose(net.hidden(users, changed)[:, :5], net.hidden(users, seqs)[:, :5])


@pytest.mark.parametrize(("backbone", "model"), COMBINATIONS)
def test_more_left_padding_does_not_change_scores(backbone, model):
    net = make(backbone, model).eval()
    users, seqs, _ = batch(length=8, min_real=1)
    seqs[:, :3] = 0  # every row has at least three padding positions
    candidates = torch.randint(1, NUM_ITEMS + 1, (len(users), 5))
    with torch.no_grad():
        full = net.score(users, seqs, candidates)
        for trim in (1, 3):
            torch.testing.assert_close(net.score(users, seqs[:, trim:], candidates), full, rtol=1e-4, atol=1e-5)
        # the loss ignores padded targets too: a longer padded window gives the same next-item loss
        if backbone != "bert4rec":
            _, long_seqs, negatives = batch(length=9, min_real=2)
            long_seqs[:, :4], negatives[:, :4] = 0, 0
            trimmed = net.loss(users, long_seqs[:, 2:], negatives[:, 2:])
            if net.distillation is not None:
                net.distillation.filled.zero_()  # same (empty) teacher bank for both calls
            torch.testing.assert_close(trimmed, net.loss(users, long_seqs, negatives))


def test_padded_positions_never_produce_nan():
    net = make("sasrec", "grasp").eval()
    users, seqs, _ = batch(length=8)
    seqs[0] = 0  # a user with no history at all
    with torch.no_grad():
        assert torch.isfinite(net.hidden(users, seqs)).all()
        assert torch.isfinite(net.score_all(users, seqs)[:, 1:]).all()


def test_bert4rec_masks_real_items_only_and_scores_with_an_appended_mask_token(monkeypatch):
    net = make("bert4rec", "id", max_len=30, mask_prob=0.2)
    seen = []
    original = net.hidden
    monkeypatch.setattr(net, "hidden", lambda users, seqs: seen.append(seqs) or original(users, seqs))
    users, seqs, negatives = batch(batch_size=200, length=31, min_real=10)
    net.loss(users, seqs, negatives)
    inputs, targets = seen[-1], seqs[:, 1:]
    masked = inputs == net.mask_token
    assert (inputs[~masked] == targets[~masked]).all() and (targets[masked] > 0).all()
    fraction = masked.sum().item() / (targets > 0).sum().item()
    assert 0.15 < fraction < 0.25
    net.score(users[:3], seqs[:3, 1:], torch.randint(1, NUM_ITEMS + 1, (3, 4)))
    assert seen[-1].shape == (3, 30) and (seen[-1][:, -1] == net.mask_token).all()
    assert (seen[-1][:, :-1] == seqs[:3, 2:]).all()  # the oldest item makes room for the mask token


@pytest.mark.parametrize("model", ["id", "grasp"])
def test_bert4rec_full_and_sampled_softmax(model):
    full = make("bert4rec", model, bert_negatives="full", mask_prob=0.5)
    sampled = make("bert4rec", model, bert_negatives=7, mask_prob=0.5)
    assert full.bert_negatives is None and sampled.bert_negatives == 7
    assert make("bert4rec", model).bert_negatives == 256  # "auto": the same sampled loss for every model
    users, seqs, negatives = batch(min_real=5)
    for net in (full, sampled):
        loss = net.loss(users, seqs, negatives)
        assert torch.isfinite(loss) and loss > 0


def test_grasp_full_softmax_scores_the_user_conditioned_items(monkeypatch):
    net = make("bert4rec", "grasp", bert_negatives="full", mask_prob=0.5, dropout=0.0).eval()
    seen = []
    original = net.hidden
    monkeypatch.setattr(net, "hidden", lambda users, seqs: seen.append(seqs) or original(users, seqs))
    users, seqs, negatives = batch(min_real=6)
    loss = net.loss(users, seqs, negatives)
    chosen = seen[-1] == net.mask_token
    assert chosen.any()
    h = original(users, seen[-1])
    # the enhancer's own chunked full-catalogue scorer, an independent path to every item's score
    logits = net.encoder.score_all(users[chosen.nonzero()[:, 0]], h[chosen])[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits, seqs[:, 1:][chosen] - 1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("backbone", "model"), [(b, "id") for b in BACKBONES] + [("sasrec", "llmesr")])
def test_first_item_has_no_context_and_is_never_a_target(backbone, model):
    net = make(backbone, model, dropout=0.0, mask_prob=0.5)
    users, seqs, negatives = batch(length=9, min_real=4)
    seqs[:, :2], negatives[:, :2] = 0, 0  # every row is left-padded and keeps at least two items
    first = (seqs > 0).int().argmax(1)
    if backbone != "bert4rec":
        rows = torch.arange(len(users))
        changed = negatives.clone()
        changed[rows, first] = changed[rows, first] % NUM_ITEMS + 1  # the negative paired with the first item
        state = torch.get_rng_state()
        before = net.loss(users, seqs, negatives)
        torch.set_rng_state(state)
        if net.distillation is not None:
            net.distillation.filled.zero_()
        torch.testing.assert_close(net.loss(users, seqs, changed), before)
    # users with a single training item contribute nothing: zero loss, no NaN
    single = torch.zeros_like(seqs)
    single[:, -1] = seqs[:, -1]
    if net.distillation is not None:
        net.distillation.filled.zero_()
    loss = net.loss(users, single, negatives * (single > 0))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


def test_llmesr_teacher_bank_is_saved_but_the_neighbour_table_is_not():
    tables = random_tables()
    net = make("sasrec", "llmesr", tables)
    users, seqs, negatives = batch(batch_size=NUM_USERS)
    net.loss(torch.arange(1, NUM_USERS + 1), seqs, negatives)
    state = net.state_dict()
    assert {"distillation.bank", "distillation.filled"} <= set(state) and "distillation.neighbors" not in state
    fresh = make("sasrec", "llmesr", tables)
    fresh.load_state_dict(state)
    assert fresh.distillation.filled[1:].all() and torch.equal(fresh.distillation.bank, net.distillation.bank)


def test_llmesr_bank_gathers_unequal_shards_across_ranks(tmp_path):
    from _ddp_worker import gather_bank_worker

    torch.multiprocessing.spawn(gather_bank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    users = torch.tensor([1, 3, 5, 7, 9, 2, 4, 6])
    expected = torch.zeros(11, 3)
    expected[users] = users[:, None].float() * torch.tensor([1.0, 10.0, 100.0])
    for rank in range(2):
        saved = torch.load(tmp_path / f"bank{rank}.pt")
        torch.testing.assert_close(saved["bank"], expected)
        assert saved["filled"].nonzero().squeeze(1).sort().values.tolist() == sorted(users.tolist())


def test_hae_branch_ablations_resize_the_mlp_and_change_the_output():
    tables = random_tables()
    d = SMALL["d"]
    widths = {("self",): d, ("similar",): d, ("global",): 2 * d, ("self", "global"): 3 * d}
    users, seqs, _ = batch(length=8)
    outputs = {}
    for branches, width in widths.items():
        torch.manual_seed(0)
        net = make("sasrec", "grasp", tables, hae_branches=branches).eval()
        assert net.encoder.enhancer.mlp[0].in_features == width
        with torch.no_grad():
            outputs[branches] = net.encoder.enhance(users, seqs)
    torch.manual_seed(0)
    full = make("sasrec", "grasp", tables).eval()
    assert full.encoder.enhancer.mlp[0].in_features == 4 * d
    for out in outputs.values():
        assert out.shape == (len(users), 8, d) and (out[seqs == 0] == 0).all()
    assert not torch.allclose(outputs[("self",)], outputs[("similar",)])


@pytest.mark.parametrize("branches", [("self", "similar", "global"), ("self",), ("similar", "global")])
def test_fused_enhancer_equals_the_op_then_the_mlp(branches):
    """The sigmoid enhancer runs holistic_attention_projected; it must equal holistic_attention + the MLP, in
    value and in every parameter's gradient."""
    torch.manual_seed(0)
    net = make("sasrec", "grasp", hae_branches=branches, dropout=0.0)
    enhancer = net.encoder.enhancer
    users, seqs, _ = batch(length=8)
    fused = net.encoder.enhance(users, seqs)
    fused_grads = torch.autograd.grad(fused.square().sum(), list(enhancer.parameters()))
    u, u_sim = net.encoder.adapt_users(users)
    i, i_sim = net.encoder.adapt_items(seqs)
    unfused = enhancer.combine(u, u_sim, i, i_sim, seqs > 0)
    unfused_grads = torch.autograd.grad(unfused.square().sum(), list(enhancer.parameters()))
    torch.testing.assert_close(fused, unfused)
    for g, gu in zip(fused_grads, unfused_grads, strict=True):
        torch.testing.assert_close(g, gu)


@pytest.mark.parametrize("ids", [NUM_ITEMS // 2, NUM_ITEMS + 2, 3 * NUM_ITEMS])
def test_adapt_distinct_whole_table_and_distinct_rows_agree(ids):
    """Fewer ids than rows: the adapter runs on the distinct ones; at least as many: on the whole table."""
    tables = (torch.randn(NUM_ITEMS + 2, DIM), torch.randn(NUM_ITEMS + 2, DIM))
    adapter = torch.nn.Linear(DIM, 5)
    items = torch.randint(0, NUM_ITEMS + 2, (ids,))
    (a, b), index = item_encoders._adapt_distinct(adapter, tables, items)
    assert len(a) == (len(torch.unique(items)) if ids < NUM_ITEMS + 2 else NUM_ITEMS + 2)
    torch.testing.assert_close(a[index], adapter(tables[0][items]))
    torch.testing.assert_close(b[index], adapter(tables[1][items]))


def test_grasp_trains_under_cpu_autocast():
    """bfloat16 autocast (what --amp does on CUDA): the fused op casts the adapters' outputs and the layer's
    float32 weight to bfloat16, as nn.Linear would, and the float32 weight gets a float32 gradient."""
    net = make("sasrec", "grasp")
    assert net.encoder.enhancer.fused(torch.device("cpu"))
    users, seqs, negatives = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net.loss(users, seqs, negatives)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.encoder.enhancer.mlp[0].weight.grad.dtype == torch.float32
    assert net.encoder.enhancer.mlp[0].weight.grad.abs().sum() > 0


def test_grasp_enhancer_stays_fused_in_deterministic_mode():
    """The fused op's kernels have deterministic backwards, so deterministic mode keeps the enhancer on the fused
    op on every device, and a training step's gradients are bitwise reproducible."""
    net = make("sasrec", "grasp", dropout=0.0)
    enhancer = net.encoder.enhancer
    users, seqs, negatives = batch()
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    grads = []
    try:
        torch.use_deterministic_algorithms(True)
        assert enhancer.fused(torch.device("cpu"))
        if not projected_backend_reason("triton", "cuda"):
            assert enhancer.fused(torch.device("cuda"))
        for _ in range(2):
            net.zero_grad()
            net.loss(users, seqs, negatives).backward()
            grads.append([p.grad.clone() for p in enhancer.parameters()])
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_grasp_backend_env_decides_whether_the_enhancer_fuses(monkeypatch):
    net = make("sasrec", "grasp").eval()
    cpu = torch.device("cpu")
    monkeypatch.setenv("GRASP_BACKEND", "reference")
    assert net.encoder.enhancer.fused(cpu)
    monkeypatch.setenv("GRASP_BACKEND", "cuda")  # no fused kernel for CPU tensors: the unfused op (and its error)
    assert not net.encoder.enhancer.fused(cpu)
    users, seqs, _ = batch(length=8)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        net.encoder.enhance(users, seqs)


def test_backend_without_a_fused_kernel_runs_the_unfused_op(monkeypatch):
    calls = []

    def unfused(user, user_sim, item, item_sim, *, mask, activation, backend):
        calls.append(backend)
        return holistic_attention_reference(user, user_sim, item, item_sim, mask, activation)

    monkeypatch.setattr(importlib.import_module("grasp.nn.holistic_attention"), "holistic_attention", unfused)
    net = make("sasrec", "grasp").eval()
    net.encoder.enhancer.backend = "cuda"
    users, seqs, _ = batch(length=8)
    with torch.no_grad():
        net.encoder.enhance(users, seqs)
    assert calls == ["cuda"]


def test_grasp_id_init_defaults_to_pca_the_llminit_embeddings():
    tables = random_tables()
    grasp_pca = make("sasrec", "grasp", tables, id_init="pca")
    llminit = make("sasrec", "llminit", tables)
    torch.testing.assert_close(grasp_pca.encoder.embedding.weight[: NUM_ITEMS + 1],
                               llminit.encoder.embedding.weight[: NUM_ITEMS + 1])  # fmt: skip
    default = make("sasrec", "grasp", tables)
    torch.testing.assert_close(default.encoder.embedding.weight[: NUM_ITEMS + 1],
                               grasp_pca.encoder.embedding.weight[: NUM_ITEMS + 1])  # fmt: skip
    random_init = make("sasrec", "grasp", tables, id_init="random")
    assert not torch.allclose(random_init.encoder.embedding.weight[1:], grasp_pca.encoder.embedding.weight[1:])


@pytest.mark.parametrize("dim", [8, DIM])  # below and above d = 16
def test_grasp_adapter_init_pca_starts_the_gates_from_the_llm_similarity(dim):
    tables = random_llm_tables(NUM_USERS, NUM_ITEMS, dim)
    net = make("sasrec", "grasp", tables, adapter_init="pca").eval()
    enhancer, d = net.encoder.enhancer, SMALL["d"]
    users, items = (torch.from_numpy(t[1:]).double() for t in (tables.user, tables.item))
    with torch.no_grad():
        u, i = enhancer.user_adapter(users.float()).double(), enhancer.item_adapter(items.float()).double()
    logits = u @ i.T / d**0.5
    # the adapted items have RMS norm 1; the self logits, over every (user, item) pair, standard deviation 1
    torch.testing.assert_close(i.square().sum(1).mean(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(logits.std(correction=0), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    mean = torch.cat([users, items]).mean(0)
    centred = (users - mean) @ (items - mean).T
    if dim <= d:  # every principal direction kept: the logits are the centred LLM dot products, scaled
        scale = (logits * centred).sum() / centred.square().sum()
        torch.testing.assert_close(logits, scale * centred, rtol=0, atol=1e-5 * logits.abs().max().item())
    else:
        # 0.97 or more over 300 seeds
        assert torch.corrcoef(torch.stack([logits.flatten(), centred.flatten()]))[0, 1] > 0.9
    default = make("sasrec", "grasp", tables)
    assert not torch.allclose(default.encoder.enhancer.user_adapter[0].weight, enhancer.user_adapter[0].weight)


def test_grasp_adapter_init_pca_streams_the_tables_in_chunks(monkeypatch):
    tables = random_tables()
    whole = make("sasrec", "grasp", tables, adapter_init="pca").encoder.enhancer
    monkeypatch.setattr(item_encoders, "_rows_float64", functools.partial(item_encoders._rows_float64, chunk=5))
    chunked = make("sasrec", "grasp", tables, adapter_init="pca").encoder.enhancer
    for adapter in ("user_adapter", "item_adapter"):
        for a, b in zip(getattr(whole, adapter).parameters(), getattr(chunked, adapter).parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_self_branch_ignores_the_neighbour_tables():
    tables = random_tables()
    torch.manual_seed(0)
    net = make("sasrec", "grasp", tables, hae_branches=("self",)).eval()
    users, seqs, _ = batch(length=8)
    with torch.no_grad():
        before = net.encoder.enhance(users, seqs)
        net.encoder.item_sim.normal_()
        net.encoder.user_sim.normal_()
        torch.testing.assert_close(net.encoder.enhance(users, seqs), before)


def test_no_attention_concatenates_without_the_op(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("holistic_attention called with attention=False")

    net = make("sasrec", "grasp", attention=False).eval()
    monkeypatch.setattr(importlib.import_module("grasp.nn.holistic_attention"), "holistic_attention", fail)
    assert net.encoder.enhancer.mlp[0].in_features == 4 * SMALL["d"]
    users, seqs, negatives = batch()
    assert torch.isfinite(net.loss(users, seqs, negatives))


def test_softmax_gates_depend_on_the_candidate_row():
    net = make("sasrec", "grasp", activation="softmax").eval()
    users, seqs, _ = batch(length=8)
    everything = torch.arange(1, NUM_ITEMS + 1).expand(len(users), -1)
    with torch.no_grad():
        # score_all normalises over the whole catalogue: the same as one candidate list of all items
        torch.testing.assert_close(net.score_all(users, seqs)[:, 1:], net.score(users, seqs, everything))
        short = net.score(users, seqs, everything[:, :5])
    assert not torch.allclose(short, net.score(users, seqs, everything)[:, :5])


def test_llminit_embeddings_are_the_principal_components():
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    n, dim, d = 60, 32, 4
    factors = rng.standard_normal((n, 6)) * np.array([10, 7, 5, 3.5, 2, 1])
    item = np.vstack([np.zeros(dim), factors @ np.linalg.qr(rng.standard_normal((dim, 6)))[0].T])
    item = (item + 0.01 * rng.standard_normal(item.shape)).astype(np.float32)
    item[0] = 0
    tables = random_tables(num_items=n, dim=dim)
    tables.item = tables.item_sim = item
    net = build_model("sasrec", "llminit", num_users=NUM_USERS, num_items=n, tables=tables, d=d, max_len=8)
    emb = net.encoder.embedding.weight.detach().numpy()
    assert (emb[0] == 0).all()
    centered = item[1:] - item[1:].mean(0)
    expected = centered @ np.linalg.svd(centered, full_matrices=False)[2][:d].T
    for j in range(d):
        assert abs(np.corrcoef(emb[1 : n + 1, j], expected[:, j])[0, 1]) > 0.999
    assert emb[1 : n + 1].std() == pytest.approx(d**-0.5, rel=2e-2)


def test_pca_embedding_pads_when_the_table_is_narrower_than_d():
    item = np.vstack([np.zeros(3), np.random.default_rng(0).standard_normal((10, 3))]).astype(np.float32)
    emb = pca_embedding(item, 8, 0.1)
    assert emb.shape == (11, 8) and (emb[0] == 0).all() and torch.isfinite(emb).all()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_llmesr_distillation_term(backbone):
    net = make(backbone, "llmesr", dropout=0.0, mask_prob=0.5).eval()
    users = torch.arange(1, NUM_USERS + 1)
    net.distillation.neighbors[1:] = torch.roll(users, 1).unsqueeze(1)  # each user's neighbour: the previous one
    _, seqs, negatives = batch(batch_size=NUM_USERS)
    state = torch.get_rng_state()
    first = net.loss(users, seqs, negatives)  # bank empty: no teacher yet
    assert net.distillation.filled[1:].all()
    rep = net.hidden(users, seqs[:, :-1] if backbone != "bert4rec" else seqs[:, 1:])[:, -1]
    torch.set_rng_state(state)
    net.distillation.filled.zero_()
    assert net.distillation(users, rep) == 0
    term = net.distillation(users, rep)
    assert term > 0
    torch.set_rng_state(state)
    with_teacher = net.loss(users, seqs, negatives)
    if backbone != "bert4rec":  # BERT4Rec masks differently per call (the RNG moved on)
        torch.testing.assert_close(with_teacher - first, 0.1 * term, rtol=1e-3, atol=1e-6)
    assert with_teacher.requires_grad


def test_build_model_errors():
    tables = random_tables()

    def build(**kwargs):
        args = {"num_users": NUM_USERS, "num_items": NUM_ITEMS, "tables": tables} | kwargs
        return build_model(args.pop("backbone", "sasrec"), args.pop("model", "grasp"), **args)

    with pytest.raises(ValueError, match="backbone: unknown 'transformer'; valid: sasrec, bert4rec, gru4rec"):
        build(backbone="transformer")
    with pytest.raises(ValueError, match="model: unknown 'llm'; valid: id, grasp, llminit, llmesr"):
        build(model="llm")
    for model in ("grasp", "llminit", "llmesr"):
        with pytest.raises(ValueError, match="tables: required"):
            build(model=model, tables=None)
    assert build(model="id", tables=None).objective == "next"
    bad = random_tables(num_items=NUM_ITEMS + 1)
    with pytest.raises(
        ValueError, match=rf"tables.item has shape \({NUM_ITEMS + 2}, {DIM}\), expected \({NUM_ITEMS + 1}"
    ):
        build(tables=bad)
    bad = random_tables()
    bad.user_sim = bad.user_sim[:, :5]
    with pytest.raises(ValueError, match=r"tables.user_sim has shape .*tables.user's shape"):
        build(tables=bad)
    bad = random_tables()
    bad.user_neighbors[3, 0] = NUM_USERS + 1
    with pytest.raises(ValueError, match="user_neighbors"):
        build(model="llmesr", tables=bad)
    bad = random_tables()
    bad.item[2, 1] = np.nan
    with pytest.raises(ValueError, match="tables.item: must be a finite"):
        build(tables=bad)
    with pytest.raises(ValueError, match="hae_branches must name at least one"):
        build(hae_branches=())
    with pytest.raises(ValueError, match="hae_branches: unknown 'local'"):
        build(hae_branches=("self", "local"))
    with pytest.raises(ValueError, match="activation: unknown 'tanh'"):
        build(activation="tanh")
    with pytest.raises(ValueError, match="incompatible flags"):
        build(attention=False, activation="softmax")
    with pytest.raises(ValueError, match="incompatible flags"):
        build(attention=False, hae_branches=("self",))
    with pytest.raises(ValueError, match="no enhancer"):
        build(model="id", hae_branches=("self",))
    with pytest.raises(ValueError, match="id_init: unknown 'zeros'; valid: random, pca"):
        build(id_init="zeros")
    with pytest.raises(ValueError, match="id_init applies to model 'grasp' only, not 'id'"):
        build(model="id", id_init="random")
    with pytest.raises(ValueError, match="adapter_init: unknown 'zeros'; valid: random, pca"):
        build(adapter_init="zeros")
    with pytest.raises(ValueError, match="adapter_init applies to model 'grasp' only, not 'llminit'"):
        build(model="llminit", adapter_init="pca")
    narrow = random_tables()
    narrow.user, narrow.user_sim = narrow.user[:, :5].copy(), narrow.user_sim[:, :5].copy()
    with pytest.raises(ValueError, match="needs user and item LLM embeddings of one width, got 5 and 24"):
        build(tables=narrow, adapter_init="pca")
    with pytest.raises(ValueError, match="llmesr_alpha applies"):
        build(model="id", llmesr_alpha=0.5)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build(d=10, num_heads=3)
    with pytest.raises(ValueError, match="num_items must be a positive int"):
        build(num_items=0)
    with pytest.raises(ValueError, match="dropout"):
        build(dropout=1.0)
    with pytest.raises(ValueError, match="bert_negatives"):
        build(backbone="bert4rec", bert_negatives=0)
    net = build(model="id", d=16, max_len=8)
    users, seqs, negatives = batch(length=9)
    with pytest.raises(ValueError, match="seqs has length 9; expected 1..8"):
        net.score_all(users, seqs)
    with pytest.raises(ValueError, match="negatives must have seqs' shape"):
        net.loss(users, seqs, negatives[:, 1:])


@pytest.mark.parametrize("model", ["id", "grasp"])
def test_sasrec_learns_a_deterministic_pattern(model):
    """Every user walks the catalogue in steps of +1 (cyclic): the model must learn to predict the next item."""
    length = 10
    net = make("sasrec", model, d=32, max_len=length, dropout=0.0, num_heads=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(100):
        users = torch.randint(1, NUM_USERS + 1, (64,))
        starts = torch.randint(0, NUM_ITEMS, (64, 1))
        seqs = (starts + torch.arange(length + 1)) % NUM_ITEMS + 1
        negatives = torch.randint(1, NUM_ITEMS + 1, seqs.shape)
        loss = net.loss(users, seqs, negatives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    users = torch.randint(1, NUM_USERS + 1, (NUM_ITEMS,))
    seqs = (torch.arange(NUM_ITEMS).unsqueeze(1) + torch.arange(length + 1)) % NUM_ITEMS + 1
    with torch.no_grad():
        top = net.score_all(users, seqs[:, :-1]).argmax(1)
    assert (top == seqs[:, -1]).float().mean() > 0.9


@pytest.mark.parametrize(("backbone", "model", "options"), [
    *((b, m, {}) for b, m in COMBINATIONS),
    ("sasrec", "grasp", {"activation": "softmax"}),  # no fold: the top of score_all
    ("sasrec", "grasp", {"hae_branches": ("self", "global")}),
])  # fmt: skip
def test_encoder_top_k_is_the_top_of_score_all(backbone, model, options):
    """encoder.topk (grasp.ops.score_topk, the enhancer folded for grasp) against score_all + a stable sort:
    the same scores, the k best items up to rounding, no excluded item; k = 1 to every item that remains."""
    net = make(backbone, model, **options).eval()
    users, seqs, _ = batch(length=8)
    with torch.no_grad():
        state = net.user_state(users, seqs)
        every = net.encoder.score_all(users, state)[:, 1:].double()
        exclude = seqs[:, -4:]  # the last items of the history; 0 entries (padding) are ignored
        rows = torch.arange(len(users)).unsqueeze(1).expand_as(exclude)
        every[rows[exclude > 0], exclude[exclude > 0] - 1] = float("-inf")
        remaining = int(torch.isfinite(every).sum(1).min())
        for k in (1, 5, remaining, NUM_ITEMS):
            scores, items = net.encoder.topk(users, state, k, exclude)
            assert scores.shape == items.shape == (len(users), k) and scores.dtype == torch.float32
            real = items > 0
            assert (real.sum(1) == torch.isfinite(every).sum(1).clamp(max=k)).all()
            assert torch.isneginf(scores[~real]).all()
            truth = every.gather(1, (items - 1).clamp(min=0))
            torch.testing.assert_close(scores.double()[real], truth[real], atol=1e-5, rtol=1e-5)
            kth = every.sort(1, descending=True).values[:, :k]
            assert (truth[real] >= kth[real] - 1e-5).all()
            assert not (items.unsqueeze(2) == exclude.unsqueeze(1)).logical_and(exclude.unsqueeze(1) > 0).any()
