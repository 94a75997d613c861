"""The crosscoder: one dictionary over two models' activations, in three variants.

Layout. Features are ordered ``[A-exclusive | shared | B-exclusive]``. Model A's encoder and decoder
are stored only for the first two blocks and model B's only for the last two, so a DFC exclusive
feature cannot read from or write to the other model: the weights that would do so do not exist
(the public ``W_dec_b`` pads them with exact zeros). ``batchtopk`` and ``dsf`` have empty exclusive
blocks. Tensor names end in their shape: ``n`` pairs, ``D`` features, ``A``/``B`` model widths,
``m`` selected entries.

Scale. ``encode``/``decode`` take and return *raw* activations. Inside, each model's input is
multiplied by its normalisation scalar (METHOD §3) so that both contribute equally; decoder
vectors in a model's raw space are ``W_dec / scale`` (see ``decoder_raw``).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import storage
from .config import CrosscoderConfig
from .distributed import DistContext, global_batch_topk
from .sparse import (
    SelectedEntries,
    batch_topk,
    selected_pre_activations,
    sparse_decode,
    threshold_select,
)

CHECKPOINT_FORMAT = "crosscoder-audit/crosscoder"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or of another format."""


@dataclass
class SparseCodes:
    """Active entries of a batch: coordinates plus differentiable values ``[m]``."""

    entries: SelectedEntries
    values: Tensor | None  # set right after selection, by Crosscoder.values_at
    pre_nD: Tensor  # detached dense pre-activations, reused by AuxK
    scores_nD: Tensor  # detached selection scores
    pre_live_nD: Tensor | None = None  # dense kernels: pre-activations that carry gradients

    def dense(self, dict_size: int) -> Tensor:
        f = torch.zeros(self.entries.n, dict_size, dtype=self.values.dtype, device=self.values.device)
        f[self.entries.rows, self.entries.cols] = self.values.detach()
        return f


class Crosscoder(nn.Module):
    def __init__(self, config: CrosscoderConfig):
        super().__init__()
        self.config = config
        D, n_a, n_s = config.dict_size, config.n_a_only, config.n_shared
        self.width_a = n_a + n_s  # features model A can see
        self.width_b = n_s + config.n_b_only
        self.offset_b = n_a  # first feature model B can see

        self.W_enc_AD = nn.Parameter(torch.empty(config.d_a, self.width_a))
        self.W_enc_BD = nn.Parameter(torch.empty(config.d_b, self.width_b))
        self.b_enc_D = nn.Parameter(torch.zeros(D))
        self.W_dec_DA = nn.Parameter(torch.empty(self.width_a, config.d_a))
        self.W_dec_DB = nn.Parameter(torch.empty(self.width_b, config.d_b))
        self.b_dec_A = nn.Parameter(torch.zeros(config.d_a))
        self.b_dec_B = nn.Parameter(torch.zeros(config.d_b))

        # DSF: the designated-shared features' selection scores are divided by the cost ratio.
        cost = torch.ones(D)
        if config.n_designated_shared:
            cost[: config.n_designated_shared] = config.shared_cost_ratio
        self.register_buffer("score_cost_D", cost)
        # Inference threshold θ on the selection score; NaN until training has set it.
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer(
            "norm_scales", torch.tensor([config.norm_scale_a or 1.0, config.norm_scale_b or 1.0])
        )
        self.training_metrics: dict = {}
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Unit-norm decoder rows from one shared random draw; encoder = decoder transpose."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        draw = torch.randn(cfg.dict_size, max(cfg.d_a, cfg.d_b), generator=generator)
        with torch.no_grad():
            dec_a = draw[: self.width_a, : cfg.d_a]
            dec_b = draw[self.offset_b :, : cfg.d_b]
            self.W_dec_DA.copy_(dec_a / dec_a.norm(dim=1, keepdim=True))
            self.W_dec_DB.copy_(dec_b / dec_b.norm(dim=1, keepdim=True))
            self.W_enc_AD.copy_(self.W_dec_DA.T)
            self.W_enc_BD.copy_(self.W_dec_DB.T)

    @torch.no_grad()
    def init_exclusive_from_residuals(self, x_nA: Tensor, x_nB: Tensor, ridge: float = 1e-2) -> None:
        """DFC: start each exclusive feature on a direction the other model cannot explain.

        Regress each model's (normalised) activations on the other's with ridge least squares;
        the residual is what is private to that model. Exclusive decoder rows are set to
        residual rows drawn from its largest-norm quarter, normalised (encoder = transpose).
        Without this, the much larger shared partition has more random directions near any
        concept and absorbs the exclusive ones before their dedicated features can compete.
        """
        cfg = self.config
        if cfg.n_exclusive == 0:
            return
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        for target, source, rows in (
            (x_nA, x_nB, slice(0, cfg.n_a_only)),
            (x_nB, x_nA, slice(cfg.n_shared, cfg.n_shared + cfg.n_b_only)),
        ):
            t = (target - target.mean(0)).float().cpu()
            s = (source - source.mean(0)).float().cpu()
            gram = s.T @ s + ridge * s.shape[0] * torch.eye(s.shape[1])
            residual = t - s @ torch.linalg.solve(gram, s.T @ t)
            pool = torch.argsort(residual.norm(dim=1), descending=True)[: max(cfg.n_exclusive, residual.shape[0] // 4)]
            if pool.numel() < cfg.n_exclusive:  # fewer pairs than features: stay random
                continue
            directions = _spread_out(residual[pool], cfg.n_exclusive, generator)
            decoder = self.W_dec_DA if target is x_nA else self.W_dec_DB
            encoder = self.W_enc_AD if target is x_nA else self.W_enc_BD
            decoder[rows] = directions.to(decoder)
            encoder[:, rows] = directions.T.to(encoder)

    # ---- public views ---------------------------------------------------------------------------
    @property
    def index_a(self) -> Tensor:
        """Ids of features exclusive to model A (empty for batchtopk/dsf)."""
        return torch.arange(0, self.config.n_a_only)

    @property
    def index_b(self) -> Tensor:
        return torch.arange(self.offset_b + self.config.n_shared, self.config.dict_size)

    @property
    def index_shared(self) -> Tensor:
        return torch.arange(self.offset_b, self.offset_b + self.config.n_shared)

    @property
    def W_dec_a(self) -> Tensor:
        """``[D, d_a]`` decoder into model A's normalised space; rows of B-exclusive features are zero."""
        pad = torch.zeros(self.config.n_b_only, self.config.d_a, dtype=self.W_dec_DA.dtype, device=self.W_dec_DA.device)
        return torch.cat([self.W_dec_DA, pad])

    @property
    def W_dec_b(self) -> Tensor:
        pad = torch.zeros(self.config.n_a_only, self.config.d_b, dtype=self.W_dec_DB.dtype, device=self.W_dec_DB.device)
        return torch.cat([pad, self.W_dec_DB])

    @property
    def W_enc_a(self) -> Tensor:
        """``[d_a, D]`` encoder from model A's normalised space; B-exclusive columns are zero."""
        pad = torch.zeros(self.config.d_a, self.config.n_b_only, dtype=self.W_enc_AD.dtype, device=self.W_enc_AD.device)
        return torch.cat([self.W_enc_AD, pad], dim=1)

    @property
    def W_enc_b(self) -> Tensor:
        pad = torch.zeros(self.config.d_b, self.config.n_a_only, dtype=self.W_enc_BD.dtype, device=self.W_enc_BD.device)
        return torch.cat([pad, self.W_enc_BD], dim=1)

    def decoder_raw(self, model: str) -> Tensor:
        """Decoder ``[D, d]`` of ``model`` ('a' or 'b') in that model's raw activation scale."""
        if model == "a":
            return self.W_dec_a / self.norm_scales[0]
        if model == "b":
            return self.W_dec_b / self.norm_scales[1]
        raise ValueError(f"model must be 'a' or 'b', got {model!r}")

    def decoder_norms(self) -> tuple[Tensor, Tensor]:
        """Per-feature decoder norms ``([D], [D])`` in each model's normalised space."""
        return self.W_dec_a.norm(dim=1), self.W_dec_b.norm(dim=1)

    def relative_norm(self) -> Tensor:
        """``r_j = |d_j^A| / (|d_j^A| + |d_j^B|)``: 1 means A-only, 0 B-only, 0.5 shared; NaN for a
        feature whose decoder is zero in both models (it writes nothing, so it is neither model's)."""
        norm_a, norm_b = self.decoder_norms()
        total = norm_a + norm_b
        return torch.where(total > 0, norm_a / total.clamp_min(1e-12), torch.full_like(total, float("nan")))

    def nonfinite_parameters(self) -> list[str]:
        """Names of the parameters holding NaN or infinite values (buffers, e.g. θ before it is set,
        may be NaN by design and are not checked)."""
        return [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]

    # ---- the computation ------------------------------------------------------------------------
    def normalise(self, x_nA: Tensor, x_nB: Tensor) -> tuple[Tensor, Tensor]:
        return x_nA * self.norm_scales[0], x_nB * self.norm_scales[1]

    def pre_activations(self, x_nA: Tensor, x_nB: Tensor) -> Tensor:
        """Dense encoder output ``[n, D]`` (before ReLU) from *normalised* inputs."""
        n_a, n_s = self.config.n_a_only, self.config.n_shared
        if self.config.n_exclusive == 0:
            return torch.addmm(self.b_enc_D, x_nA, self.W_enc_AD).addmm_(x_nB, self.W_enc_BD)
        from_a = x_nA @ self.W_enc_AD  # [n, n_a + n_s]
        from_b = x_nB @ self.W_enc_BD  # [n, n_s + n_b]
        pre = torch.cat([from_a[:, :n_a], from_a[:, n_a:] + from_b[:, :n_s], from_b[:, n_s:]], dim=1)
        return pre + self.b_enc_D

    def selection_scores(self, pre_nD: Tensor) -> Tensor:
        """BatchTopK score ``relu(pre) · (|d^A| + |d^B|) / cost``, detached."""
        norm_a, norm_b = self._decoder_norms_padded()
        return torch.relu(pre_nD.detach()) * ((norm_a + norm_b) / self.score_cost_D).detach()

    def _decoder_norms_padded(self) -> tuple[Tensor, Tensor]:
        cfg = self.config
        zeros_a = torch.zeros(cfg.n_b_only, device=self.W_dec_DA.device, dtype=self.W_dec_DA.dtype)
        zeros_b = torch.zeros(cfg.n_a_only, device=self.W_dec_DB.device, dtype=self.W_dec_DB.dtype)
        norm_a = torch.cat([self.W_dec_DA.detach().norm(dim=1), zeros_a])
        norm_b = torch.cat([zeros_b, self.W_dec_DB.detach().norm(dim=1)])
        return norm_a, norm_b

    def sparse_codes(self, x_nA: Tensor, x_nB: Tensor, k: int | None = None, dense: bool = False,
                     sync: DistContext | None = None, global_rows: int | None = None) -> SparseCodes:
        """Select active entries from normalised inputs: BatchTopK with ``k`` if given, else θ.

        ``dense`` keeps gradients on the full pre-activation matrix (plain matmul backward),
        which is faster on GPUs; the default routes gradients only through selected entries.
        With ``sync`` (a distributed step), the batch is this rank's share of a global batch of
        ``global_rows`` pairs and BatchTopK selects over the global batch.
        """
        pre_live = self.pre_activations(x_nA, x_nB) if dense and torch.is_grad_enabled() else None
        with torch.no_grad():
            pre = pre_live.detach() if pre_live is not None else self.pre_activations(x_nA, x_nB)
        scores = self.selection_scores(pre)
        if k is None and math.isnan(float(self.threshold)):
            raise RuntimeError(
                "this crosscoder has no inference threshold yet (it was not trained long enough "
                "to set one); pass k= to select by BatchTopK"
            )
        if k is not None:
            cost = self.score_cost_D if self.config.n_designated_shared else None
            if sync is not None and sync.active:
                entries = global_batch_topk(scores, (global_rows or x_nA.shape[0]) * k, sync, cost)
            else:
                entries = batch_topk(scores, x_nA.shape[0] * k, cost)
        else:
            entries = threshold_select(scores, float(self.threshold))
        codes = SparseCodes(entries, None, pre, scores, pre_live)
        codes.values = self.values_at(codes, entries, x_nA, x_nB)
        return codes

    def values_at(self, codes: SparseCodes, entries: SelectedEntries, x_nA: Tensor, x_nB: Tensor) -> Tensor:
        """Differentiable pre-activations ``[m]`` at ``entries`` of a batch already encoded."""
        if codes.pre_live_nD is not None:
            return codes.pre_live_nD[entries.rows, entries.cols]
        return selected_pre_activations(
            codes.pre_nD, entries, x_nA, x_nB, self.W_enc_AD, self.W_enc_BD, self.b_enc_D, self.offset_b
        )

    def decode_sparse(
        self, entries: SelectedEntries, values_m: Tensor, with_bias: bool = True, dense: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Normalised-space reconstructions ``([n, d_a], [n, d_b])`` from active entries."""
        if dense:
            f = torch.zeros(entries.n, self.config.dict_size, dtype=values_m.dtype, device=values_m.device)
            f = f.index_put((entries.rows, entries.cols), values_m)
            x_hat_a = f[:, : self.width_a] @ self.W_dec_DA
            x_hat_b = f[:, self.offset_b :] @ self.W_dec_DB
        else:
            x_hat_a = sparse_decode(entries, values_m, self.W_dec_DA, col_offset=0)
            x_hat_b = sparse_decode(entries, values_m, self.W_dec_DB, col_offset=self.offset_b)
        if with_bias:
            x_hat_a = x_hat_a + self.b_dec_A
            x_hat_b = x_hat_b + self.b_dec_B
        return x_hat_a, x_hat_b

    def decode_features(self, feature_ids: Tensor, rows_m: Tensor, slots_m: Tensor, values_m: Tensor, n: int
                        ) -> tuple[Tensor, Tensor]:
        """Normalised-space reconstructions without bias from entries of a few features only.

        ``feature_ids [S]``: the features; entry ``i`` is value ``values_m[i]`` of feature
        ``feature_ids[slots_m[i]]`` on pair ``rows_m[i]`` of ``n``. Dense matmuls over ``S`` columns,
        not ``D``.
        """
        f = torch.zeros(n, feature_ids.shape[0], dtype=values_m.dtype, device=values_m.device)
        f = f.index_put((rows_m, slots_m), values_m)
        in_a, in_b = feature_ids < self.width_a, feature_ids >= self.offset_b
        x_hat_a = f[:, in_a] @ self.W_dec_DA[feature_ids[in_a]]
        x_hat_b = f[:, in_b] @ self.W_dec_DB[feature_ids[in_b] - self.offset_b]
        return x_hat_a, x_hat_b

    @torch.no_grad()
    def encode(self, x_a: Tensor, x_b: Tensor, k: int | None = None) -> Tensor:
        """Sparse codes ``[n, D]`` of *raw* activations ``x_a [n, d_a]``, ``x_b [n, d_b]``.

        Uses the inference threshold θ learned in training (so mean L0 ≈ k); pass ``k`` to use
        BatchTopK over this batch instead.
        """
        x_a, x_b = self._check_inputs(x_a, x_b)
        codes = self.sparse_codes(*self.normalise(x_a, x_b), k=k)
        return codes.dense(self.config.dict_size)

    @torch.no_grad()
    def decode(self, f_nD: Tensor) -> tuple[Tensor, Tensor]:
        """Raw-space reconstructions ``([n, d_a], [n, d_b])`` of codes ``f [n, D]``."""
        if f_nD.ndim != 2 or f_nD.shape[1] != self.config.dict_size:
            raise ValueError(f"decode: expected codes [n, {self.config.dict_size}], got {tuple(f_nD.shape)}")
        f_nD = f_nD.to(self.W_dec_DA.dtype)
        x_hat_a = f_nD[:, : self.width_a] @ self.W_dec_DA + self.b_dec_A
        x_hat_b = f_nD[:, self.offset_b :] @ self.W_dec_DB + self.b_dec_B
        return x_hat_a / self.norm_scales[0], x_hat_b / self.norm_scales[1]

    def _check_inputs(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        check_pair_batch(x_a, x_b, cfg.d_a, cfg.d_b, where="encode")
        dtype, device = self.W_enc_AD.dtype, self.W_enc_AD.device
        return x_a.to(device=device, dtype=dtype), x_b.to(device=device, dtype=dtype)

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path | str:
        """Write ``model.safetensors`` + ``config.json`` into folder ``path`` (each atomically).

        Both files carry the same random save id, so a save killed between the two is detected
        at load time instead of pairing new weights with an old config. ``path`` may be an fsspec
        URL (``s3://bucket/run``): the files are written to a temporary folder and uploaded in
        the same order, weights first.
        """
        if storage.is_url(path):
            url = storage.locate(path)
            check_url(url)
            with tempfile.TemporaryDirectory(prefix="crosscoder-save-") as tmp:
                self.save(tmp)
                for name in ("model.safetensors", "config.json"):
                    storage.upload(Path(tmp) / name, storage.child(url, name))
            return url
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_id = secrets.token_hex(8)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        weights_tmp = folder / f".model.safetensors.{save_id}.tmp"
        save_file(tensors, str(weights_tmp), metadata={"format": CHECKPOINT_FORMAT, "save_id": save_id})
        os.replace(weights_tmp, folder / "model.safetensors")
        write_json_atomic(folder / "config.json", self.describe() | {"save_id": save_id})
        return folder

    def describe(self) -> dict:
        """Self-describing JSON: settings, partition ranges, scales, θ, training metrics."""
        cfg = self.config
        n_a, n_s = cfg.n_a_only, cfg.n_shared
        threshold = float(self.threshold)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": json.loads(cfg.model_dump_json()),
            "partitions": {
                "a_only": [0, n_a],
                "shared": [n_a, n_a + n_s],
                "b_only": [n_a + n_s, cfg.dict_size],
                "designated_shared": [0, cfg.n_designated_shared],
            },
            "norm_scales": {"a": float(self.norm_scales[0]), "b": float(self.norm_scales[1])},
            "threshold": None if math.isnan(threshold) else threshold,
            "training": self.training_metrics,
        }

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Crosscoder:
        """Load a folder written by :meth:`save` (a path or an fsspec URL); needs no spec.

        A URL's two files are downloaded into the local cache first (see :mod:`crosscoder.storage`).
        """
        if storage.is_url(path):
            url = storage.locate(path)
            check_url(url)
            for name in ("config.json", "model.safetensors"):
                try:
                    storage.download(storage.child(url, name))
                except FileNotFoundError:
                    raise CheckpointError(f"{storage.child(url, name)} is missing: {url} is not a crosscoder "
                                          "checkpoint") from None
            folder, where = storage.cache_folder(url), url  # errors name the URL, not its cache
        else:
            folder = where = Path(path)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        for required in (config_path, weights_path):
            if not required.is_file():
                raise CheckpointError(f"{required} is missing: {folder} is not a crosscoder checkpoint")
        try:
            meta = json.loads(config_path.read_text())
            if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
                raise ValueError("it holds no crosscoder configuration")
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{storage.child(where, 'config.json')} cannot be read ({exc}); the checkpoint is "
                                  "damaged: use the previous one or retrain") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{storage.child(where, 'config.json')}: format {meta.get('format')!r} is not "
                                  f"{CHECKPOINT_FORMAT!r}")
        if meta.get("version", 0) > CHECKPOINT_VERSION:
            raise CheckpointError(f"{storage.child(where, 'config.json')}: version {meta['version']} is newer than "
                                  "this code reads")
        from safetensors import safe_open

        try:
            with safe_open(str(weights_path), framework="pt") as handle:
                weights_id = (handle.metadata() or {}).get("save_id")
                weights = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a truncated file
            raise CheckpointError(f"{storage.child(where, 'model.safetensors')} cannot be read ({exc}); the "
                                  "checkpoint is damaged: use the previous one or retrain") from None
        if weights_id != meta.get("save_id"):
            raise CheckpointError(
                f"{where}: model.safetensors and config.json come from different saves "
                "(a save was interrupted); use the previous checkpoint or retrain"
            )
        model = cls(CrosscoderConfig.model_validate(meta["config"]))
        model.load_state_dict(weights)
        bad = model.nonfinite_parameters()
        if bad:
            raise CheckpointError(f"{storage.child(where, 'model.safetensors')}: {', '.join(sorted(bad))} hold NaN or "
                                  "infinite values; the checkpoint is damaged or came from a diverged run")
        model.training_metrics = meta.get("training", {})
        return model.to(device)


def _spread_out(candidates_nd: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Pick ``count`` unit directions from the candidates, each as unlike the earlier ones as
    possible (farthest-point by |cosine|), so rare private directions get a feature too."""
    unit = candidates_nd / candidates_nd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    first = int(torch.randint(unit.shape[0], (1,), generator=generator))
    chosen = [first]
    closest = (unit @ unit[first]).abs()
    for _ in range(count - 1):
        nxt = int(torch.argmin(closest))
        chosen.append(nxt)
        closest = torch.maximum(closest, (unit @ unit[nxt]).abs())
    return unit[chosen]


def check_pair_batch(x_a: Tensor, x_b: Tensor, d_a: int, d_b: int, where: str) -> None:
    """Raise a clear error when a batch of pairs has the wrong shape or non-finite values."""
    if x_a.ndim != 2 or x_b.ndim != 2:
        raise ValueError(f"{where}: expected 2-D tensors [n, d], got x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)}")
    if x_a.shape[1] != d_a or x_b.shape[1] != d_b:
        raise ValueError(
            f"{where}: data widths ({x_a.shape[1]}, {x_b.shape[1]}) do not match the config's "
            f"d_a={d_a}, d_b={d_b}"
        )
    if x_a.shape[0] != x_b.shape[0]:
        raise ValueError(f"{where}: x_a has {x_a.shape[0]} rows but x_b has {x_b.shape[0]}: pairs must line up")
    for name, x in (("x_a", x_a), ("x_b", x_b)):
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).squeeze(1)
            raise ValueError(
                f"{where}: {name} has NaN or infinite values in {bad.numel()} row(s), first at row {int(bad[0])}"
            )


def check_url(url: str) -> None:
    """A URL that no installed fsspec backend opens is a CheckpointError that says what to install."""
    try:
        storage.filesystem(url)
    except storage.StorageError as exc:
        raise CheckpointError(str(exc)) from exc


def write_json_atomic(path: Path, payload: Any, indent: int | None = 2, default=None) -> None:
    """``payload`` as JSON at ``path``, written to a temporary file first: a stopped process leaves the old
    file or the new one, never half of one. ``default``: as ``json.dumps`` takes it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(payload, indent=indent, sort_keys=True, default=default))
    os.replace(tmp, path)
