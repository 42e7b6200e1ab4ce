"""Singular-space merge methods: TSV-M, Iso-C, Iso-CTS, KnOTS and NP-LoRA. Pure tensor maths, no file I/O.

Every method is written once, on "cores": the tasks' matrices τᵢ (p×q) expressed in a basis they share.
- LoRA inputs (`merge_lowrank`): the ups U = [w₁s₁B₁ … ] (m×R) and downs V = [A₁; …] (R×n) are stacked and
  QR'd once, U = Q_B R_B and Vᵀ = Q_A R_A; task i is τᵢ = Q_B Mᵢ Q_Aᵀ with the small core
  Mᵢ = R_B[:, Iᵢ] R_A[:, Iᵢ]ᵀ (R×R at most). Q_B and Q_A have orthonormal columns, so the SVD of Mᵢ *is*
  task i's SVD (left vectors Q_B·u, right Q_A·v), the SVD of Σ Mᵢ is the sum's, and the nearest orthonormal
  matrix of Q_B·X is Q_B·polar(X): each method below runs on R×R matrices and is exact for the m×n
  problem. Only the result is lifted back, as factors (m×k, k×n). No m×n matrix is ever formed.
- dense deltas (`merge_dense`, registered in merge_methods for checkpoint deltas): the cores are the
  deltas themselves, the bases the identity.

"The spectrum" of a matrix is its non-zero singular values: below RTOL·σ_max a value counts as zero (float32
QR rounding sits near 1e-7·σ_max), so a direction that is only rounding noise is never given weight (Iso's
flat spectrum would lift it to the mean). D = the core size min(p, q): Σ ranks for LoRAs, min(m, n) for a
dense delta (the iso methods count the non-zero singular values of the sum, the same for inputs in general
position). Methods and sources (facts from the papers; our own code):

  tsv      Task Singular Vectors merge (Gargiulo et al., CVPR 2025). Each of the T tasks keeps its top
           ⌊tsv_fraction·D/T⌋ singular triplets (the paper's 1/T compression; at most its rank); the kept
           left vectors of all tasks are concatenated and replaced by their polar factor (U⊥ = P Qᵀ from
           the SVD P Σ Qᵀ of the concatenation: the nearest matrix with orthonormal columns), the right
           vectors likewise, and merged = α · U⊥ diag(σ_concat) V⊥ᵀ.
  iso_c    Iso-C (Marczak et al., ICML 2025, "No Task Left Behind"): M = Σ τᵢ = U Σ Vᵀ, merged =
           α · mean(σ) · U Vᵀ (the spectrum flattened to its mean).
  iso_cts  Iso-CTS (same paper): the top k = ⌊f·D⌋ directions of the sum (f = common_space_fraction, 0.8 in
           the authors' configs; D − k rounded to a multiple of T as the authors do, at most D) form the
           common subspace; each task adds the top (D − k)/T directions of its residual (I − U_c U_cᵀ)·τᵢ
           (at most that residual's rank); the concatenated left and right vectors are orthogonalised
           (polar factor), and every singular value is the mean of the kept ones: merged = α · σ̄ · U⊥ V⊥ᵀ.
  knots    KnOTS (Stoica et al., ICLR 2025): one SVD of the concatenation [τ₁ … τ_T] = U Σ [V₁ᵀ … V_Tᵀ];
           the task coordinates Vᵢᵀ (D×n) are merged element-wise (ties, dare_*, magnitude_prune, linear) and
           merged = α · U Σ V_mergedᵀ. For LoRAs the concatenation is Q_B [R_B,ᵢ R_A,ᵢᵀ]ᵢ blockdiag(Q_A,ᵢᵀ)
           (each down QR'd on its own), so U, Σ and the Vᵢ come from a p×R core; only the D×n coordinates
           the element-wise merge is defined on are formed.
  np_lora  NP-LoRA (Chen et al., arXiv 2511.11051): the style LoRA's principal output directions U_k (its
           top-k left singular vectors; all of its rank by default) and the subject LoRA projected off them,
           merged = τ_style + (I − c·U_k U_kᵀ) τ_subject with c = μ/(1+μ): the minimiser of
           ‖X − τ_subject‖² + μ‖U_kᵀX‖², 0 = plain sum, ∞ = hard null-space projection (the paper's soft
           projection interpolates between these two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from library.errors import LoraToolsError
from library.lowrank import RotatedSVD
from library.methods import SINGULAR_METHODS, SingularParams

RTOL = 1e-5  # singular values below RTOL·σ_max are rounding noise, not directions

Task = tuple[torch.Tensor, torch.Tensor]  # (up [m, r] with weight and alpha/rank folded in, down [r, n])
Pair = tuple[torch.Tensor, torch.Tensor]  # (left [p, k], right [k, q]): left @ right = the merged core


# ---------------------------------------------------------------------------------------------------------
# Building blocks


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x, full_matrices=False)


def _count_above(S: torch.Tensor, scale: float) -> int:
    return int(S.gt(RTOL * scale).sum()) if scale > 0 else 0


def polar(x: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns to x (p×k, k ≤ p): P Qᵀ from x = P Σ Qᵀ (Procrustes)."""
    if x.shape[-1] == 0:
        return x
    P, _, Qh = _svd(x)
    return P @ Qh


def _params(ctx) -> SingularParams:
    return getattr(ctx, "singular", None) or SingularParams()


# ---------------------------------------------------------------------------------------------------------
# The methods on cores (float64 p×q matrices; weights already applied)


def tsv_core(cores: Sequence[torch.Tensor], params: SingularParams) -> Pair:
    p, q = cores[0].shape
    svds = [_svd(M) for M in cores]
    scale = max((float(S[0]) for _, S, _ in svds if S.numel()), default=0.0)
    tasks = [(U, S, Vh) for U, S, Vh in svds if _count_above(S, scale) > 0]
    if not tasks:
        return cores[0].new_zeros(p, 0), cores[0].new_zeros(0, q)
    # D = the joint rank budget: the core size, or Σ ranks when smaller (dense low-rank deltas give the same D).
    D = min(p, q, sum(_count_above(S, scale) for _, S, _ in tasks))
    per_task = max(1, math.floor(params.tsv_fraction * D / len(tasks)))
    us, ss, vs = [], [], []
    for U, S, Vh in tasks:
        k = min(per_task, _count_above(S, scale))
        us.append(U[:, :k])
        ss.append(S[:k])
        vs.append(Vh[:k].T)
    S = torch.cat(ss)
    return polar(torch.cat(us, 1)) * (params.merge_alpha * S), polar(torch.cat(vs, 1)).T


def iso_c_core(cores: Sequence[torch.Tensor], params: SingularParams, keep: int | None = None) -> Pair:
    U, S, Vh = _svd(sum(cores))
    d = _count_above(S, float(S[0]) if S.numel() else 0.0)
    mean = float(S[:d].mean()) if d else 0.0
    k = d if keep is None else min(d, keep)  # the flat result keeps the sum's leading directions first
    return U[:, :k] * (params.merge_alpha * mean), Vh[:k]


def iso_cts_core(cores: Sequence[torch.Tensor], params: SingularParams, keep: int | None = None) -> Pair:
    U, S, Vh = _svd(sum(cores))
    scale = float(S[0]) if S.numel() else 0.0
    D = _count_above(S, scale)
    if D == 0:
        return iso_c_core(cores, params, keep)
    T = len(cores)
    common = int(D * params.common_space_fraction)
    # The authors' rounding, so that every task gets the same number of directions (never more than D in all).
    specific_total = min(round((D - common) / T), D // T) * T
    common = D - specific_total
    per_task = specific_total // T
    uc, sc, vc = U[:, :common], S[:common], Vh[:common].T
    us, ss, vs = [uc], [sc], [vc]
    for M in cores:
        residual = M - uc @ (uc.T @ M)
        ur, sr, vrh = _svd(residual)
        k = min(per_task, _count_above(sr, scale))
        us.append(ur[:, :k])
        ss.append(sr[:k])
        vs.append(vrh[:k].T)
    sigmas = torch.cat(ss)
    mean = float(sigmas.mean())
    # Truncation order of the flat result: the common directions first, then the task directions by σ.
    order = torch.cat([torch.arange(common), common + torch.argsort(sigmas[common:], descending=True, stable=True)])
    if keep is not None:
        order = order[:keep]
    u_orth, v_orth = polar(torch.cat(us, 1)), polar(torch.cat(vs, 1))
    return u_orth[:, order] * (params.merge_alpha * mean), v_orth[:, order].T


def np_lora_core(subject: torch.Tensor | None, style: torch.Tensor | None, params: SingularParams) -> torch.Tensor:
    """τ_style + (I − c·U_k U_kᵀ)·τ_subject; a layer only one of the two LoRAs covers keeps that one."""
    if subject is None or style is None:
        return subject if style is None else style
    U, S, _ = _svd(style)
    k = _count_above(S, float(S[0]) if S.numel() else 0.0)
    if params.np_rank is not None:
        k = min(k, params.np_rank)
    c = 1.0 if math.isinf(params.np_mu) else params.np_mu / (1.0 + params.np_mu)
    uk = U[:, :k]
    return style + subject - c * (uk @ (uk.T @ subject))


def knots_core(lefts: Sequence[torch.Tensor | None], right_bases: Sequence[torch.Tensor | None] | None,
               out_cols: int, ctx) -> Pair:
    """KnOTS on [L₁ … L_T]·blockdiag(Wᵢᵀ): lefts[i] is p×qᵢ (None: the file has no delta here), right_bases[i]
    the n×qᵢ orthonormal basis Wᵢ of task i's rows (None: the identity, dense deltas). Returns (U·αΣ, V_merged)."""
    from library.merge_methods import MergeContext, check_context, get_method, merge_tensors, ties_merge

    params = _params(ctx)
    present = [i for i, L in enumerate(lefts) if L is not None]
    concat = torch.cat([lefts[i] for i in present], 1)
    U, S, Vh = _svd(concat)
    D = _count_above(S, float(S[0]) if S.numel() else 0.0)
    U, S, Vh = U[:, :D], S[:D], Vh[:D]
    dtype = Vh.dtype if right_bases is None else next(b.dtype for b in right_bases if b is not None)
    method = "add" if params.knots_method == "linear" else params.knots_method
    blocks, start = {}, 0
    for i in present:
        blocks[i] = Vh[:, start:start + lefts[i].shape[1]]
        start += lefts[i].shape[1]
    if method == "add" and right_bases is not None:
        # Σᵢ Vᵢᵀ = Vh·[W₁ … W_T]ᵀ in one product: the T coordinate matrices of a plain sum are never formed.
        merged = Vh.to(dtype) @ torch.cat([right_bases[i].T for i in present], 0)
        return U * (params.merge_alpha * S), merged
    # The T·D·n coordinates in the factors' dtype, stacked in place: their element-wise merge is the costly
    # step of knots. A file absent here is a zero task (a no-op in every element-wise method).
    coords = Vh.new_zeros((len(lefts), D, out_cols), dtype=dtype) if len(present) < len(lefts) else \
        Vh.new_empty((len(lefts), D, out_cols), dtype=dtype)
    for i in present:
        if right_bases is None:
            coords[i] = blocks[i]
        else:
            torch.matmul(blocks[i].to(dtype), right_bases[i].T, out=coords[i])
    inner = MergeContext(density=ctx.density, sign_method=ctx.sign_method, seed=ctx.seed, name=f"{ctx.name}#knots")
    if method == "ties":
        check_context(get_method(method), inner)
        merged = ties_merge(coords, [1.0] * len(lefts), inner.density, inner.sign_method)  # coords are ours: overwritten
    else:
        merged = merge_tensors(method, list(coords), [1.0] * len(lefts), inner)
    return U * (params.merge_alpha * S), merged


def _merge_cores(method: str, cores: Sequence[torch.Tensor | None], ctx, keep: int | None) -> Pair:
    """tsv / iso_c / iso_cts / np_lora on the cores (None = a file with no delta on this layer)."""
    params = _params(ctx)
    if method == "np_lora":
        if len(cores) != 2:
            raise LoraToolsError(f"np_lora merges exactly two LoRAs (subject, then style), got {len(cores)}",
                                 key=ctx.name or None)
        merged = np_lora_core(cores[0], cores[1], params)
        p, q = merged.shape
        eye = torch.eye(min(p, q), dtype=merged.dtype, device=merged.device)
        return (merged, eye) if q <= p else (eye, merged)
    present = [M for M in cores if M is not None]
    if method == "tsv":
        return tsv_core(present, params)
    if method == "iso_c":
        return iso_c_core(present, params, keep)
    if method == "iso_cts":
        return iso_cts_core(present, params, keep)
    raise LoraToolsError(f"{method!r} is not a singular-space method ({', '.join(SINGULAR_METHODS)})")


# ---------------------------------------------------------------------------------------------------------
# LoRA inputs: the factored route


def merge_lowrank(method: str, tasks: Sequence[Task | None], ctx, *, keep: int | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged delta of one layer as factors (up [m, k], down [k, n]): merge_lowrank_svd as U·diag(S), Vh."""
    U, S, Vh = merge_lowrank_svd(method, tasks, ctx, keep=keep, dtype=dtype).full()
    return U * S.unsqueeze(0), Vh


def merge_lowrank_svd(method: str, tasks: Sequence[Task | None], ctx, *, keep: int | None = None,
                      dtype: torch.dtype = torch.float32) -> RotatedSVD:
    """The exact thin SVD of one layer's merged delta (k ≤ min(m, n, R) triplets, as a lowrank.RotatedSVD whose
    vectors are formed on demand: `.leading(k)`, `.full()`), never forming m×n.

    tasks[i] is input i's (up, down) with its weight and alpha/rank folded into up (None: no delta on this
    layer). `ctx` carries `singular` (SingularParams) and, for knots, density / sign_method / seed / name
    (a merge_methods.MergeContext). `keep` caps the rank of the flat-spectrum methods (iso_*) in their
    own order. QRs run in `dtype`, the cores in float64. The result is Q_B·C·Q_Aᵀ with a small core C, so
    its SVD is Q_B·svd(C)·Q_Aᵀ: the engine truncates it without another pass over the m×R factors.
    """
    present = [i for i, t in enumerate(tasks) if t is not None]
    if not present:
        raise LoraToolsError("no input has a delta on this layer", key=getattr(ctx, "name", None) or None)
    ups = [tasks[i][0].to(dtype) for i in present]
    downs = [tasks[i][1].to(dtype) for i in present]
    q_b, r_b = torch.linalg.qr(torch.cat(ups, 1))  # m×p, p×R
    r_b = r_b.double()
    bounds, start = [], 0
    for up in ups:
        bounds.append((start, start + up.shape[1]))
        start += up.shape[1]
    if method == "knots":
        # One shared left basis; each task's rows get their own right basis (the concatenation is block-diagonal).
        lefts: list[torch.Tensor | None] = [None] * len(tasks)
        bases: list[torch.Tensor | None] = [None] * len(tasks)
        if len({d.shape[0] for d in downs}) == 1:  # equal ranks: one batched QR
            qrs = list(zip(*torch.linalg.qr(torch.stack(downs).transpose(1, 2))))
        else:
            qrs = [torch.linalg.qr(down.T) for down in downs]
        for i, (w, r_a), (a, b) in zip(present, qrs, bounds):
            lefts[i], bases[i] = r_b[:, a:b] @ r_a.double().T, w
        left, coords = knots_core(lefts, bases, downs[0].shape[1], ctx)
        q_a, r_c = torch.linalg.qr(coords.T)  # the merged coordinates D×n (in `dtype`) = r_cᵀ q_aᵀ
        core = left @ r_c.double().T
    else:
        q_a, r_a = torch.linalg.qr(torch.cat(downs, 0).T)  # n×q, q×R
        r_a = r_a.double()
        cores: list[torch.Tensor | None] = [None] * len(tasks)
        for i, (a, b) in zip(present, bounds):
            cores[i] = r_b[:, a:b] @ r_a[:, a:b].T
        left, right = _merge_cores(method, cores, ctx, keep)
        core = left @ right
    cu, S, cvh = _svd(core)  # p×q at most: Σr×Σr
    # Kept as Q_B·cu, cvh·Q_Aᵀ: the engine forms only the singular vectors it keeps (16 of 160 for a rank-16 merge).
    return RotatedSVD(q_b, cu, S.to(dtype), cvh, q_a)


# ---------------------------------------------------------------------------------------------------------
# Dense deltas (checkpoint differences): the same methods with identity bases


def merge_dense(method: str, tensors: Sequence[torch.Tensor], weights: Sequence[float], ctx=None) -> torch.Tensor:
    """The method on dense same-shaped deltas (merge_methods' signature). Matrices and convs ([out, in, kh, kw],
    flattened to [out, in·kh·kw]) are merged in float64; vectors (biases, norms) have no singular vectors
    and are summed with their weights, as task arithmetic does."""
    from library.merge_methods import MergeContext

    ctx = ctx or MergeContext()
    shape, dtype = tensors[0].shape, tensors[0].dtype
    if len(shape) < 2:
        return sum(t * float(w) for t, w in zip(tensors, weights))
    cores = [t.reshape(shape[0], -1).double() * float(w) for t, w in zip(tensors, weights)]
    if method == "knots":
        left, right = knots_core(cores, None, cores[0].shape[1], ctx)
        right = right.double()
    else:
        left, right = _merge_cores(method, cores, ctx, None)
    return (left @ right).reshape(shape).to(dtype)


def _dense_function(method: str):
    def merge(tensors, weights, ctx):
        return merge_dense(method, tensors, weights, ctx)

    merge.__name__ = f"merge_{method}"
    return merge


# merge_methods registers these under the registry's names (merge_tensors("tsv", deltas, weights, ctx)).
DENSE_FUNCTIONS = {name: _dense_function(name) for name in SINGULAR_METHODS}
