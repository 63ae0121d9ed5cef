"""The function-preserving steps of an upgrade, on the canonical float64 representation (``model``).

Notation
========
``h`` is the residual stream (a row vector of size ``d``; ``D`` after the upgrade).  A linear layer
``y = W x + b`` stores ``W`` as ``[out, in]``.  "Readers" are the linears that read a normalised
residual (``q/k/v_proj``, ``gate/up_proj``, ``query_key_value``, ``dense_h_to_4h``, ``lm_head``);
"writers" are the linears whose output is added to the residual (``o_proj``/``dense``,
``down_proj``/``dense_4h_to_h``, and the embedding).  Every upgrade step below maps the old residual
``h`` of *every* layer boundary to ``T h`` (``T`` is ``D x d``), so it is enough to show that each
block's contribution transforms the same way and that the readers see the same inputs.

Norms (exact formulas of transformers 5.x):
  * llama / qwen2 RMSNorm:  ``n(x) = w * x / sqrt(mean(x^2) + eps)``.
  * gemma3 RMSNorm:         ``n(x) = (1 + w) * x / sqrt(mean(x^2) + eps)`` (computed in float32).
    Internally we always work with the *effective* weight ``g = 1 + w`` (``g = w`` for the others).
  * gpt_neox / bloom LayerNorm: ``n(x) = w * (x - mean(x)) / sqrt(var(x) + eps) + b``.
gemma3 additionally multiplies the embedding by ``sqrt(hidden_size)``, normalises the *outputs* of the
attention and of the MLP (``post_attention_layernorm``, ``post_feedforward_layernorm``) before adding
them to the residual, and applies ``q_norm``/``k_norm`` (RMSNorm over ``head_dim``, sharing
``config.rms_norm_eps``) per head; its attention scale is ``query_pre_attn_scalar ** -0.5``.
gpt_neox fuses q, k, v in one linear whose output rows are laid out ``[head][q|k|v][head_size]``
(``qkv.view(..., num_heads, 3*head_size)`` then ``chunk(3)``), applies RoPE to the first
``partial_rotary_factor * head_size`` dims of each head, and (by default) uses a parallel residual
``h + attn(ln1(h)) + mlp(ln2(h))``.
bloom fuses q, k, v the same way (``[head][q|k|v][head_dim]``, all linears with biases), has no
rotary embedding but ALiBi: head ``h`` of ``H`` adds ``m_h * (j - i)`` to its scores, with slopes
``m_h`` that depend on ``h`` *and* on ``H`` (a geometric sequence from ``2^floor(log2 H)``); its
embedding goes through a LayerNorm (``word_embeddings_layernorm``) before the first layer, its MLP
is ``dense_4h_to_h(gelu(dense_h_to_4h x))`` of width exactly ``4 * hidden_size`` (no config field),
``head_dim = hidden_size / n_head``, and its residual is sequential (``apply_residual_connection_
post_layernorm`` false).  What that leaves function-preserving for bloom:
  * residual: only a *permutation* (as gpt_neox; the embedding LayerNorm's weight and bias are
    permuted with it, ``LN(P e) = P LN(e)`` for permuted weights).  A rotation fixing the all-ones
    direction would commute with the centring, but not with the embedding LayerNorm's element-wise
    weight, whose output *is* the residual (no linear follows it to fold the weight into); sign
    flips break the centring.  Widening is impossible twice over: LayerNorm centres over all ``D``
    dims (zero-padding changes mean and variance), and ``head_dim = D / H`` would change;
  * heads: nothing.  A permuted head meets another slope, an added head changes ``H`` and with it
    every slope (even with a zero ``dense`` column) and ``head_dim``; attention is multi-head, so
    there is no kv group to replicate;
  * MLP: permuting neurons is exact; adding neurons is not expressible (width ``4 * hidden_size``);
  * identity layers (ALiBi does not depend on the layer), vocabulary changes, folding the input
    norms into ``query_key_value`` / ``dense_h_to_4h`` (never the embedding LayerNorm: its output
    is the residual itself) -- all exact.
The unsupported kinds raise ``ValueError`` naming the reason (``_check_spec``).

The steps, applied in this order (each one is exactly function preserving, hence so is any
composition):

1. ``fold_norms`` -- fold the norm weight into its readers.  For a pre-norm followed by readers
   ``W_k``: ``W_k (g * x/rms) = (W_k diag(g)) (x/rms)``, so ``W_k <- W_k diag(g)`` and ``g <- 1``
   (gemma3: ``w <- 0``).  LayerNorm: ``W (w*n + b) = W diag(w) (n + b/w)``, so ``w <- 1``,
   ``b <- b / w``, ``W <- W diag(w)`` (requires ``w != 0``).  Folded: input norms (before q/k/v and
   before gate/up, or before ``query_key_value`` / ``dense_h_to_4h``) and the final norm into
   ``lm_head`` (only when ``lm_head`` is untied -- folding into a tied head would change the
   embedding).  Never folded: gemma3's post-attention/post-feedforward norms (their output goes into
   the residual, nothing linear follows) and ``q_norm``/``k_norm`` (RoPE follows them).
   ``rotate_residual`` on llama/qwen2 *implies* folding (see 5.), and then the final norm is folded
   into ``lm_head`` even when it was tied: the upgraded model is written untied.

2. Vocabulary.  ``extra_vocab``: append rows to the embedding and ``lm_head`` (they are never read
   by old token ids, and old logits are columns of ``lm_head`` rows that do not change).  The added
   tokens need logits of their own too, and greedy decoding over the whole new vocabulary must not
   pick them: by default (``added_token_logits="mean"``) their ``lm_head`` rows are the mean of the
   old rows, so each added logit is the mean of the old logits -- never above their maximum (a
   soft-cap is monotone) -- while the embedding rows are random (tied: the same mean rows).
   ``"random"`` draws random ``lm_head`` rows as well (the generator's first behaviour, kept to
   reproduce the benchmark's derived model): then only old-id logits are preserved, and on
   SmolLM2-135M with 1000 added tokens 33 of 48 greedy generations of an adapted model took an
   added token.
   ``renumber_vocab``: a permutation ``s`` of token ids; row ``i`` moves to row ``s(i)`` of both
   matrices, and the tokenizer's vocab ids (and special-token ids in the config) are renamed the
   same way.  The ground truth ``token_map`` is ``old id -> new id``.

3. MLP neurons.  ``down(act(gate x) * (up x))`` (gpt_neox: ``down(act(up x + b))``) is a sum over
   neurons, so permuting the rows of gate/up (and their biases) together with the columns of down
   changes nothing (``permute_neurons``), and a new neuron with a zero column in ``down`` adds
   ``0 * anything = 0`` (``extra_neurons``; its gate/up rows are random).

4. Attention heads (``head_dim`` is never changed and no dimension *within* a head is ever moved,
   so RoPE, ``q_norm``/``k_norm`` and the attention scale are untouched).  With ``G = H / KV`` query
   heads per kv group, query head ``j*G + p`` attends with kv head ``j``; the output is
   ``sum_heads O[:, head] softmax(q_head k_j^T) v_j``.
   * ``kv_replication = r``: every kv head ``j`` is copied to ``j*r .. j*r+r-1``; the new group size
     is ``G/r`` and query head ``j*G + p`` (unchanged index!) now belongs to new kv group
     ``j*r + p // (G/r)``, a copy of ``j``.  Requires ``G % r == 0``.
   * ``extra_query_heads_per_group = e``: every (new) kv group gets ``e`` new query heads with random
     ``q_proj`` rows and *zero* ``o_proj`` columns, so they contribute nothing.
   * ``permute_heads``: permute the kv groups (k/v rows and their biases) and, inside every group,
     its query heads (``q_proj`` rows + bias and ``o_proj`` columns); the sum over heads is
     unchanged.  For MHA (gpt_neox) this is a plain head permutation of the fused ``[q|k|v]`` blocks.
   qwen2's q/k/v biases live in head space, so they follow the head maps (and are untouched by the
   residual transforms of 5.).

5. Residual stream.  Here ``T = P c [I; 0]`` with ``c = sqrt(D/d)`` and ``P`` (``D x D``) orthogonal.
   * ``widen_residual = k`` (``D = d + k``; not for gpt_neox: LayerNorm subtracts the mean over all
     ``D`` dims, which zero-padding changes).  We scale the residual by ``c`` instead of touching
     ``eps``.  For ``h' = c [h; 0]``:
     ``mean_D(h'^2) + eps = c^2 |h|^2 / D + eps = |h|^2 / d + eps``, so ``rms_D(h') = rms_d(h)``
     *exactly, with the same eps* (rescaling eps by ``d/D`` instead would also change gemma3's
     ``q_norm``/``k_norm``, which share ``rms_norm_eps``).  Therefore
     - writers: ``W <- c [W; 0]``, ``b <- c [b; 0]``; embedding ``E <- c [E, 0]`` (gemma3: the
       embedding scale changes from ``sqrt(d)`` to ``sqrt(D)`` and ``c sqrt(d) / sqrt(D) = 1``, so
       ``E <- [E, 0]``);
     - a pre-norm sees ``c [h; 0] / rms_d(h)``: its weight becomes ``[g; r] / (c a)`` and its readers
       ``a [W, R]`` (``r``, ``R`` random: those inputs are always 0; ``a = 1``, except for a tied
       ``lm_head`` where ``a`` is the embedding factor so that ``lm_head == embedding`` still holds
       and ``R = 0``).  A folded norm keeps ``g = 1`` and its readers become ``[W / c, R]``;
     - gemma3 post-norms: their input is an ``o_proj``/``down_proj`` output, which is now
       ``c [y; 0]`` with ``rms_D = rms_d(y)``, and their output must be ``c [n(y); 0]``: the weight
       becomes ``[g; r]`` (no rescale).
   * ``rotate_residual``: ``h <- P h``.  Writers ``W <- P W``, ``b <- P b``, embedding ``E <- E P^T``,
     readers ``W <- W P^T``.  An element-wise norm weight commutes with ``P`` only if ``P`` is a
     (signed) permutation: for ``(P x)_i = s_i x_pi(i)``,
     ``(P x) * (|P| g) = P (x * g)`` and ``rms(P x) = rms(x)``.  So
     - llama / qwen2: ``P`` is a random orthogonal matrix; this needs every residual norm to have a
       scalar weight, so all of them are folded first (step 1, forced);
     - gemma3: ``P`` is a random *signed permutation* (the post-norms cannot be folded, so a general
       rotation is impossible); norm weights ``g <- |P| g``;
     - gpt_neox / bloom: ``P`` is a random *permutation* (LayerNorm's mean subtraction forbids sign
       flips); ``w <- P w``, ``b <- P b`` (bloom: for its embedding LayerNorm too).

6. ``identity_layers``: insert layers (at these indices of the *new* layer list) whose writers are
   zero (``o_proj``/``down_proj`` or ``dense``/``dense_4h_to_h``, weights *and* biases) and whose
   other weights are random: they add exactly 0 to the residual (gemma3's post-norm of 0 is 0).
   Their ``layer_types`` entry (sliding/full attention) is copied from the previous layer (the next
   one when inserted at position 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .model import LINEARS, POST_NORMS, gemma_like, randn, random_norm_weight


def _fold_norm(nm: dict, readers: list[dict]) -> None:
    g = nm["w"]
    for r in readers:
        r["w"] = r["w"] * g[None, :]
    if nm["b"] is not None:
        if (g.abs() < 1e-12).any():
            raise ValueError("cannot fold a LayerNorm with a zero weight (bias / weight undefined)")
        nm["b"] = nm["b"] / g
    nm["w"] = torch.ones_like(g)
    nm["folded"] = True


def _mlp_readers(L: dict) -> list[dict]:
    return [x for x in (L["gate"], L["up"]) if x is not None]


def step_fold(canon: dict, fold_final: bool) -> None:
    for L in canon["layers"]:
        _fold_norm(L["attn_norm"], [L["q"], L["k"], L["v"]])
        _fold_norm(L["mlp_norm"], _mlp_readers(L))
    if fold_final:
        _fold_norm(canon["final_norm"], [canon["lm_head"]])


def step_vocab(canon: dict, extra: int, renumber: bool, gen: torch.Generator, added_logits: str) -> list[int]:
    """Returns ``perm`` with perm[i] = new id of (extended) token i."""
    E = canon["embed"]
    V, d = E.shape
    if extra:
        lm = canon["lm_head"]["w"]
        mean_row = lm.mean(dim=0, keepdim=True).expand(extra, d).clone()   # logit = mean of the old logits
        if canon["tied"]:
            new_e = mean_row if added_logits == "mean" else randn(gen, extra, d) * E.std()
            new_l = new_e.clone()
        else:
            new_e = randn(gen, extra, d) * E.std()
            new_l = mean_row if added_logits == "mean" else randn(gen, extra, d) * lm.std()
        canon["embed"] = torch.cat([E, new_e])
        canon["lm_head"]["w"] = torch.cat([lm, new_l])
    n = V + extra
    if renumber:
        perm = torch.randperm(n, generator=gen).tolist()
        inv = [0] * n
        for i, p in enumerate(perm):
            inv[p] = i
        canon["embed"] = canon["embed"][inv]
        canon["lm_head"]["w"] = canon["lm_head"]["w"][inv]
    else:
        perm = list(range(n))
    canon["dims"]["vocab"] = n
    return perm


def step_neurons(canon: dict, extra: int, permute: bool, gen: torch.Generator) -> list[list]:
    maps = []
    for L in canon["layers"]:
        inter = L["up"]["w"].shape[0]
        src: list = list(range(inter)) + [None] * extra
        if extra:
            for key in ("gate", "up"):
                ln = L[key]
                if ln is None:
                    continue
                ln["w"] = torch.cat([ln["w"], randn(gen, extra, ln["w"].shape[1]) * ln["w"].std()])
                if ln["b"] is not None:
                    ln["b"] = torch.cat([ln["b"], randn(gen, extra) * ln["b"].std()])
            dn = L["down"]
            dn["w"] = torch.cat([dn["w"], torch.zeros(dn["w"].shape[0], extra, dtype=dn["w"].dtype)], dim=1)
        if permute:
            p = torch.randperm(inter + extra, generator=gen)
            for key in ("gate", "up"):
                ln = L[key]
                if ln is None:
                    continue
                ln["w"] = ln["w"][p]
                if ln["b"] is not None:
                    ln["b"] = ln["b"][p]
            L["down"]["w"] = L["down"]["w"][:, p]
            src = [src[i] for i in p.tolist()]
        maps.append(src)
    canon["dims"]["inter"] += extra
    return maps


def step_heads(canon: dict, r: int, extra: int, permute: bool, gen: torch.Generator) -> tuple[list, list]:
    dims = canon["dims"]
    H, KV, hd = dims["heads"], dims["kv_heads"], dims["head_dim"]
    G = H // KV
    G2 = G // r + extra
    KV2 = KV * r
    q_maps, kv_maps = [], []
    for L in canon["layers"]:
        d = L["q"]["w"].shape[1]
        # q: [KV, G, hd, d] -> [KV2, G/r, hd, d]  (same query-head order)
        qw = L["q"]["w"].view(KV2, G // r, hd, d)
        qb = L["q"]["b"].view(KV2, G // r, hd) if L["q"]["b"] is not None else None
        ow = L["o"]["w"].view(-1, KV2, G // r, hd)
        q_src = torch.arange(H).view(KV2, G // r)
        kv_src = torch.arange(KV).repeat_interleave(r)
        kw = L["k"]["w"].view(KV, hd, d).repeat_interleave(r, dim=0)
        vw = L["v"]["w"].view(KV, hd, d).repeat_interleave(r, dim=0)
        kb = L["k"]["b"].view(KV, hd).repeat_interleave(r, dim=0) if L["k"]["b"] is not None else None
        vb = L["v"]["b"].view(KV, hd).repeat_interleave(r, dim=0) if L["v"]["b"] is not None else None
        if extra:
            std = L["q"]["w"].std()
            qw = torch.cat([qw, randn(gen, KV2, extra, hd, d) * std], dim=1)
            if qb is not None:
                qb = torch.cat([qb, randn(gen, KV2, extra, hd) * L["q"]["b"].std()], dim=1)
            ow = torch.cat([ow, torch.zeros(ow.shape[0], KV2, extra, hd, dtype=ow.dtype)], dim=2)
            q_src = torch.cat([q_src, torch.full((KV2, extra), -1, dtype=q_src.dtype)], dim=1)
        if permute:
            gp = torch.randperm(KV2, generator=gen)
            inner = torch.stack([torch.randperm(G2, generator=gen) for _ in range(KV2)])  # [KV2, G2]
            rows = gp[:, None].expand(KV2, G2)
            qw = qw[rows, inner]
            ow = ow[:, rows, inner]
            q_src = q_src[rows, inner]
            if qb is not None:
                qb = qb[rows, inner]
            kw, vw, kv_src = kw[gp], vw[gp], kv_src[gp]
            kb = kb[gp] if kb is not None else None
            vb = vb[gp] if vb is not None else None
        L["q"]["w"] = qw.reshape(KV2 * G2 * hd, d)
        L["q"]["b"] = qb.reshape(KV2 * G2 * hd) if qb is not None else None
        L["o"]["w"] = ow.reshape(ow.shape[0], KV2 * G2 * hd)
        L["k"]["w"] = kw.reshape(KV2 * hd, d)
        L["v"]["w"] = vw.reshape(KV2 * hd, d)
        L["k"]["b"] = kb.reshape(KV2 * hd) if kb is not None else None
        L["v"]["b"] = vb.reshape(KV2 * hd) if vb is not None else None
        q_maps.append([None if x < 0 else int(x) for x in q_src.reshape(-1).tolist()])
        kv_maps.append([int(x) for x in kv_src.tolist()])
    dims["heads"] = KV2 * G2
    dims["kv_heads"] = KV2
    return q_maps, kv_maps


def _all_pre_norms(canon: dict):
    """(norm, readers, is_final) for every norm that is read by linears."""
    for L in canon["layers"]:
        yield L["attn_norm"], [L["q"], L["k"], L["v"]], False
        yield L["mlp_norm"], _mlp_readers(L), False
    yield canon["final_norm"], [canon["lm_head"]], True


def _all_writers(canon: dict):
    for L in canon["layers"]:
        yield L["o"]
        yield L["down"]


def step_widen(canon: dict, k: int, gen: torch.Generator) -> torch.Tensor:
    """Residual h -> c [h; 0] with c = sqrt(D/d).  Returns T (D x d)."""
    family = canon["family"]
    d = canon["dims"]["hidden"]
    D = d + k
    c = math.sqrt(D / d)
    emb_factor = 1.0 if gemma_like(family) else c

    def pad_cols(W, extra_cols):
        return torch.cat([W, extra_cols], dim=1)

    canon["embed"] = emb_factor * pad_cols(canon["embed"], torch.zeros(canon["embed"].shape[0], k, dtype=torch.float64))
    for wr in _all_writers(canon):
        wr["w"] = c * torch.cat([wr["w"], torch.zeros(k, wr["w"].shape[1], dtype=torch.float64)])
        if wr["b"] is not None:
            wr["b"] = c * torch.cat([wr["b"], torch.zeros(k, dtype=torch.float64)])
    for nm, readers, is_final in _all_pre_norms(canon):
        tied_head = is_final and canon["tied"]
        a = emb_factor if tied_head else 1.0
        if nm["folded"]:
            assert not tied_head, "a folded final norm implies an untied lm_head"
            nm["w"] = torch.ones(D, dtype=torch.float64)
            scale = 1.0 / c
        else:
            nm["w"] = torch.cat([nm["w"], random_norm_weight(gen, k)]) / (c * a)
            scale = a
        if nm["b"] is not None:  # pragma: no cover - LayerNorm is never widened (gpt_neox is rejected)
            raise AssertionError("LayerNorm cannot be widened")
        for r in readers:
            extra_cols = torch.zeros(r["w"].shape[0], k, dtype=torch.float64) if tied_head else (
                randn(gen, r["w"].shape[0], k) * r["w"].std())
            r["w"] = pad_cols(scale * r["w"], extra_cols)
    for L in canon["layers"]:
        for key in POST_NORMS:
            if L[key] is not None:
                L[key]["w"] = torch.cat([L[key]["w"], random_norm_weight(gen, k)])
    canon["dims"]["hidden"] = D
    T = torch.zeros(D, d, dtype=torch.float64)
    T[:d] = c * torch.eye(d, dtype=torch.float64)
    return T


def _random_orthogonal(gen: torch.Generator, n: int) -> torch.Tensor:
    A = randn(gen, n, n)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))[None, :]


def _random_signed_perm(gen: torch.Generator, n: int, signs: bool) -> torch.Tensor:
    perm = torch.randperm(n, generator=gen)
    s = torch.ones(n, dtype=torch.float64)
    if signs:
        s[torch.rand(n, generator=gen, dtype=torch.float64) < 0.5] = -1.0
    P = torch.zeros(n, n, dtype=torch.float64)
    P[torch.arange(n), perm] = s  # (P x)_i = s_i x_perm(i)
    return P


def step_rotate(canon: dict, gen: torch.Generator) -> torch.Tensor:
    """Residual h -> P h.  Returns P (D x D)."""
    family = canon["family"]
    D = canon["dims"]["hidden"]
    if family in ("llama", "qwen2"):
        P = _random_orthogonal(gen, D)
        diag_ok = False
    else:
        P = _random_signed_perm(gen, D, signs=(family == "gemma3"))
        diag_ok = True
    Pabs = P.abs()
    canon["embed"] = canon["embed"] @ P.T
    for wr in _all_writers(canon):
        wr["w"] = P @ wr["w"]
        if wr["b"] is not None:
            wr["b"] = P @ wr["b"]
    if canon.get("embed_norm") is not None:  # bloom: LN(E P^T) rows = P LN(e) with w, b permuted
        canon["embed_norm"]["w"] = Pabs @ canon["embed_norm"]["w"]
        canon["embed_norm"]["b"] = P @ canon["embed_norm"]["b"]
    for nm, readers, _ in _all_pre_norms(canon):
        if not nm["folded"]:
            if not diag_ok:
                raise AssertionError("internal: rotation of an unfolded norm")
            nm["w"] = Pabs @ nm["w"]
        if nm["b"] is not None:
            nm["b"] = P @ nm["b"]  # only gpt_neox / bloom (unsigned permutation)
        for r in readers:
            r["w"] = r["w"] @ P.T
    for L in canon["layers"]:
        for key in POST_NORMS:
            if L[key] is not None:
                L[key]["w"] = Pabs @ L[key]["w"]
    return P


def _zero_output_layer(template: dict, gen: torch.Generator) -> dict:
    """A random layer shaped like ``template`` whose residual writers are zero (adds exactly 0)."""
    L: dict[str, Any] = {}
    for key, val in template.items():
        if val is None:
            L[key] = None
        elif key in LINEARS:
            w = val["w"]
            b = val["b"]
            if key in ("o", "down"):
                L[key] = {"w": torch.zeros_like(w), "b": torch.zeros_like(b) if b is not None else None}
            else:
                L[key] = {
                    "w": randn(gen, *w.shape) * w.std(),
                    "b": randn(gen, *b.shape) * b.std() if b is not None else None,
                }
        else:  # norm
            n = val["w"].shape[0]
            L[key] = {
                "w": torch.ones(n, dtype=torch.float64) if val["folded"] else random_norm_weight(gen, n),
                "b": 0.2 * randn(gen, n) if val["b"] is not None else None,
                "folded": val["folded"],
            }
    return L


def step_identity_layers(canon: dict, positions: tuple[int, ...], layer_types: list | None, gen) -> tuple[dict, list | None]:
    old = canon["layers"]
    n_new = len(old) + len(positions)
    pos = set(positions)
    new_layers, new_types, layer_map = [], [] if layer_types is not None else None, {}
    it = 0
    for j in range(n_new):
        if j in pos:
            template = old[min(it, len(old) - 1)]  # shapes / biases / folded flags of a real layer
            new_layers.append(_zero_output_layer(template, gen))
            if new_types is not None:
                if new_types:
                    new_types.append(new_types[-1])
                else:
                    # position 0: copy the next real layer's type
                    new_types.append(layer_types[0])
        else:
            layer_map[it] = j
            new_layers.append(old[it])
            if new_types is not None:
                new_types.append(layer_types[it])
            it += 1
    canon["layers"] = new_layers
    canon["dims"]["layers"] = n_new
    return layer_map, new_types
