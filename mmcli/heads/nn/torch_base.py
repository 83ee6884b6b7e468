"""Shared machinery of the torch heads: deterministic training loop, losses, batched inference, safetensors I/O."""
from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from safetensors.torch import load_file, save_file
from scipy.special import softmax
from torch import nn

from mmcli.heads.base import CONFIG, Head, HeadParams, read_model_config
from mmcli.heads.data import Cohort
from mmcli.heads.data.bags import inference_batches
from mmcli.heads.nn.losses import class_weights, cox_ph_loss, focal_loss, regression_loss
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_json
from mmcli.pipeline.rundir import damaged, model_file

WEIGHTS = "weights.safetensors"
DEVICE_PATTERN = r"^(cpu|auto|mps|cuda(:[0-9]+)?)$"


@contextlib.contextmanager
def torch_env(seed: int | None, n_threads: int) -> Iterator[None]:
    """Fixed thread count, deterministic algorithms (where a GPU is present) and (when ``seed`` is given) a seeded
    RNG; restored after.

    On the CPU the heads' operations are deterministic at a fixed thread count, and switching deterministic
    algorithms on imports torch's compiler stack (``torch._inductor``: seconds of start-up per process), so it is
    only switched on when CUDA is available."""
    prev_threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    prev_det = torch.are_deterministic_algorithms_enabled() if cuda else None
    torch.set_num_threads(max(1, int(n_threads)))
    if cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        if prev_det is not None:
            torch.use_deterministic_algorithms(prev_det)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchParams(HeadParams):
    """Parameters shared by the torch heads (defaults as for ``attention_mil``; other heads override some)."""

    hidden: int = Field(64, ge=1, le=65_536, description="embedding size (units per layer), 1..65536")
    attn_dim: int = Field(32, ge=1, le=65_536, description="hidden size of the attention networks (units), 1..65536")
    dropout: float = Field(0.25, ge=0.0, lt=1.0, description="dropout probability, 0 <= p < 1")
    epochs: int = Field(30, ge=1, le=100_000,
                        description="passes over the training patients (fixed: no inner validation "
                        "split, which small cohorts cannot afford), >= 1")
    batch_size: int = Field(32, ge=1, le=1_000_000,
                            description="patients per mini-batch (survival: the Cox risk set is the "
                            "batch, keep it >= 16), >= 1")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate, > 0")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay, >= 0")
    loss: Literal["ce", "focal"] = Field("ce", description="classification loss: ce (cross-entropy) | focal "
                                         "(survival always uses the Cox partial likelihood)")
    regression_loss: Literal["mse", "huber"] = Field("mse", description="regression loss on the in-fold "
                                                     "standardised target: mse | huber")
    huber_delta: float = Field(1.0, gt=0.0, le=100.0, description="huber: where the loss turns linear, in standard "
                               "deviations of the training target, > 0")
    focal_gamma: float = Field(2.0, ge=0.0, description="focal loss focusing parameter, >= 0")
    class_weight: Literal["balanced", "none"] | None = Field(
        "balanced", description="balanced (n / (K * count_k)) | none | null")
    max_instances: int = Field(512, ge=1, le=10_000_000,
                               description="per bag and training step, at most this many random "
                               "instances (tiles; all of them at inference), >= 1")
    n_threads: int = Field(1, ge=1, le=1024,
                           description="torch CPU threads, 1..1024 (1: these models are small, and with "
                           "more threads than idle cores OpenMP synchronisation makes a step 10x slower)")
    device: str = Field("cpu", pattern=DEVICE_PATTERN, description="cpu | cuda | cuda:N | mps | auto")
    dp_epsilon: float | None = Field(None, gt=0.0, allow_inf_nan=False, description="DP-SGD privacy budget "
                                     "epsilon per patient (Opacus, RDP accountant), > 0; null = no DP")
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0, description="DP-SGD delta, 0 < delta < 1 (keep it below "
                            "1 / number of patients)")
    dp_max_grad_norm: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="DP-SGD per-patient "
                                    "gradient clipping norm, > 0")

    @model_validator(mode="before")
    @classmethod
    def _dp_class_weight(cls, data: Any) -> Any:
        """With dp_epsilon, class_weight defaults to none (balanced weights use label counts outside DP)."""
        if isinstance(data, dict) and data.get("dp_epsilon") is not None and "class_weight" not in data:
            data = {**data, "class_weight": "none"}
        return data

    @field_validator("dp_epsilon")
    @classmethod
    def _dp_unweighted(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("class_weight") == "balanced":
            raise ValueError("class_weight=balanced uses the training label counts, which the DP accountant "
                             "does not cover; pass --param class_weight=none with dp_epsilon")
        return v


class TorchHead(Head):
    """Base of torch heads. Training: AdamW for a fixed number of epochs over shuffled mini-batches.

    Parameters: :class:`TorchParams`.
    """

    Params = TorchParams
    hidden: int
    attn_dim: int
    dropout: float
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    loss: str
    focal_gamma: float
    class_weight: str | None
    max_instances: int
    n_threads: int
    device: str
    dp_epsilon: float | None
    dp_delta: float
    dp_max_grad_norm: float

    @property
    def n_out(self) -> int:
        return 1 if self.is_survival or self.is_regression else self.n_classes

    # ---- subclass hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _fit_preprocessing(self, X: Cohort) -> None:
        """Fit ``self.preprocessors_`` on the training cohort ``X``."""

    @abstractmethod
    def _build(self) -> nn.Module:
        """The network for ``self.spec_`` and the parameters."""

    @abstractmethod
    def _inputs(self, X: Cohort, idx: np.ndarray, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        """Batch tensors for patients ``idx`` (``rng`` given = training: instance sampling allowed)."""

    @abstractmethod
    def _forward(self, inputs: dict[str, torch.Tensor], train: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """(outputs (B, n_out), extras such as attention)."""

    def _instance_count(self, X: Cohort) -> np.ndarray:
        """Per patient, instances over its bag modalities + 1 (from metadata: no bag is read)."""
        n = np.ones(len(X), dtype=np.int64)
        for m in X.modalities.values():
            if m.spec.kind == "bag":
                assert m.bags is not None
                n += m.bags.lengths()
        return n

    # ---- training ------------------------------------------------------------------------------------------
    def _fit(self, X: Cohort, y: np.ndarray) -> None:
        self.privacy_: dict[str, Any] | None = None
        self._fit_preprocessing(X)
        dev = resolve_device(self.device)
        with torch_env(self.seed, self.n_threads):
            self.module_ = self._build().to(dev)
            opt = torch.optim.AdamW(self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            if self.dp_epsilon is not None:
                self._fit_private(X, y, opt, dev)
                self.module_.eval()
                return
            self._train_epochs(X, y, opt, np.random.default_rng(self.seed), dev, self.epochs)
        self.module_.eval()

    def _train_epochs(self, X: Cohort, y: np.ndarray, opt: torch.optim.Optimizer, rng: np.random.Generator,
                      dev: torch.device, epochs: int, penalty: Callable[[], torch.Tensor] | None = None) -> None:
        """``epochs`` passes of shuffled mini-batches over ``X``; ``penalty()`` (e.g. FedProx's proximal term)
        is added to every batch loss. Used by :meth:`_fit` and by federated local training."""
        cw = None  # class weights: classification only
        if self.is_survival:
            t_all = torch.as_tensor(np.ascontiguousarray(y["time"], dtype=np.float32))
            e_all = torch.as_tensor(np.ascontiguousarray(y["event"], dtype=np.float32))
        elif self.is_regression:  # y standardised in-fold by Head.fit
            v_all = torch.as_tensor(np.asarray(y, dtype=np.float32))
        else:
            y_all = torch.as_tensor(np.asarray(y), dtype=torch.long)
            cw = torch.as_tensor(class_weights(np.asarray(y), self.n_classes, self.class_weight)).to(dev)
        n, bs = len(X), max(2, min(self.batch_size, len(X)))
        for epoch in range(epochs):
            self.module_.train()
            perm = rng.permutation(n)
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                if len(idx) < 2:  # a lone patient: no risk set, no batch statistics worth a step
                    continue
                inputs = {k: v.to(dev) for k, v in self._inputs(X, idx, rng).items()}
                out, extras = self._forward(inputs, train=True)
                ti = torch.as_tensor(idx)
                if self.is_survival:
                    yb: Any = (t_all[ti].to(dev), e_all[ti].to(dev))
                elif self.is_regression:
                    yb = v_all[ti].to(dev)
                else:
                    yb = y_all[ti].to(dev)
                task_loss = partial(self._task_loss, y=yb, weight=cw)
                loss = task_loss(out)
                aux = self._aux_loss(extras, yb, task_loss)
                if aux is not None:
                    loss = loss + aux
                if penalty is not None:
                    loss = loss + penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, epochs)

    def _task_loss(self, out: torch.Tensor, y: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                   weight: torch.Tensor | None) -> torch.Tensor:
        """The task's loss of outputs ``out`` (B, n_out): Cox partial likelihood on ``y = (time, event)``; squared
        error or Huber on standardised targets ``y`` (B,) for regression; else focal or cross-entropy on class
        codes ``y`` (B,) with class weights ``weight`` (K,)."""
        if self.is_survival:
            assert isinstance(y, tuple)
            return cox_ph_loss(out[:, 0], y[0], y[1])
        assert isinstance(y, torch.Tensor)
        if self.is_regression:
            return regression_loss(out[:, 0], y, self.regression_loss, self.huber_delta)
        if self.loss == "focal":
            return focal_loss(out, y, self.focal_gamma, weight)
        return F.cross_entropy(out, y, weight=weight)

    def _aux_loss(self, extras: dict[str, Any], y: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                  task_loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """An auxiliary loss added to each training batch's task loss; none by default.

        ``extras``: what ``_forward(..., train=True)`` returned beside the outputs; ``y``: the batch's targets as
        :meth:`_task_loss` takes them; ``task_loss(out)``: the batch's task loss of other outputs (B, n_out).
        Heads with one (CLAM's instance clustering, DSMIL's max-instance stream) cannot train under DP-SGD."""
        return None

    def _fit_private(self, X: Cohort, y: np.ndarray, opt: torch.optim.Optimizer, dev: torch.device) -> None:
        """DP-SGD training (:mod:`mmcli.heads.nn.privacy`); records the spent budget in ``privacy_``.

        The preprocessing (scalers, PCA) is fit on the training patients outside the accountant, as in
        Opacus' own examples: the guarantee covers the network's weights given that preprocessing.
        """
        from mmcli.heads.nn.privacy import check_dp_task, check_module, dp_train, per_patient_loss, privacy_scope

        context = f"head {self.name!r}"
        if self.is_regression:
            raise InputError(f"{context}: DP-SGD (--param dp_epsilon) is for classification here; a regression "
                             "would need a bounded loss per patient. Fix: drop dp_epsilon.")
        if type(self)._aux_loss is not TorchHead._aux_loss:  # a batch-level term outside the per-patient losses
            raise InputError(f"{context}: DP-SGD (--param dp_epsilon) clips per-patient gradients of the task loss "
                             "and cannot account for this head's auxiliary loss. Fix: drop --param dp_epsilon, or "
                             "use --head attention_mil.")
        check_dp_task(survival=self.is_survival, class_weight=self.class_weight, context=context)
        check_module(self.module_, context)
        assert self.dp_epsilon is not None
        y_all = torch.as_tensor(np.asarray(y), dtype=torch.long)
        rng = np.random.default_rng(self.seed)

        def step_loss(idx: np.ndarray) -> torch.Tensor:
            inputs = {k: v.to(dev) for k, v in self._inputs(X, idx, rng).items()}
            out, _ = self._forward(inputs, train=True)
            return per_patient_loss(out, y_all[torch.as_tensor(idx)].to(dev), self.loss, self.focal_gamma)

        self.privacy_ = dp_train(self.module_, opt, len(X), batch_size=self.batch_size, epochs=self.epochs,
                                 target_epsilon=self.dp_epsilon, delta=self.dp_delta,
                                 max_grad_norm=self.dp_max_grad_norm, seed=self.seed, step_loss=step_loss)
        self.privacy_.update(privacy_scope(self.preprocessors_))  # what epsilon covers, and what it does not

    # ---- inference -------------------------------------------------------------------------------------------
    def _run(self, X: Cohort) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
        """Outputs (n, n_out) in patient order, per-batch extras, and the batch order used. Patients are batched
        by instance count (little padding), at most ``batch_size`` and about 64 MB of padded input a batch."""
        dev = resolve_device(self.device)
        counts = self._instance_count(X)
        dim = max([s.dim for s in self.spec_ if s.kind == "bag"], default=1)
        batches = inference_batches(counts, max(1, self.batch_size), dim)
        outs = np.zeros((len(X), self.n_out), dtype=np.float64)
        extras: list[dict[str, Any]] = []
        with torch_env(None, self.n_threads), torch.no_grad():
            self.module_.eval()
            for idx in batches:
                inputs = {k: v.to(dev) for k, v in self._inputs(X, idx, None).items()}
                out, extra = self._forward(inputs, train=False)
                outs[idx] = out.double().cpu().numpy()
                extra["idx"] = idx
                extras.append(extra)
        return outs, extras, np.concatenate(batches) if batches else np.zeros(0, dtype=int)

    def _to_prediction(self, outs: np.ndarray) -> np.ndarray:
        """Risk (survival), the standardised value (regression) or class probabilities."""
        return outs[:, 0] if self.is_survival or self.is_regression else softmax(outs, axis=1)

    def _predict(self, X: Cohort) -> np.ndarray:
        return self._to_prediction(self._run(X)[0])

    # ---- attention ----------------------------------------------------------------------------------------
    def _attention(self, X: Cohort, extras: list[dict[str, Any]]) -> dict[str, list[np.ndarray | None]] | None:
        """Per bag modality, each patient's attention from the extras of :meth:`_run` (None: no attention)."""
        return None

    def attention(self, X: Cohort) -> dict[str, list[np.ndarray | None]] | None:
        X = self.align(X)
        return self._attention(X, self._run(X)[1])

    def predict_explained(self, X: Cohort) -> tuple[np.ndarray, dict[str, list[np.ndarray | None]] | None]:
        """:meth:`predict` and :meth:`attention` from one pass over the bags."""
        X = self.align(X)
        outs, extras, _ = self._run(X)
        return self._to_unit(self._to_prediction(outs)), self._attention(X, extras)

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """As :meth:`Head.save`; a DP-trained model's config.json also holds its ``privacy`` record."""
        path = super().save(path)
        privacy = getattr(self, "privacy_", None)
        if privacy is not None:
            write_json(path / CONFIG, {**read_model_config(path), "privacy": privacy})
        return path

    def _save(self, path: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
        save_file(state, str(path / WEIGHTS))

    def _load(self, path: Path) -> None:
        self.privacy_ = read_model_config(path).get("privacy")
        f = path / WEIGHTS
        with model_file(f):
            state = load_file(str(f))
        self.module_ = self._build().to(resolve_device(self.device))
        try:
            self.module_.load_state_dict(state)
        except RuntimeError as e:  # size mismatch / missing keys: the weights and config.json disagree
            raise damaged(f, f"does not fit the network config.json describes ({_mismatch(e)}; was config.json "
                          "edited, e.g. n_classes or hidden sizes?)") from e
        self.module_.eval()


def _mismatch(e: RuntimeError) -> str:
    """The first concrete line of torch's load_state_dict error (e.g. ``size mismatch for head.weight: ...``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:] if ln), lines[0] if lines else "")
    return detail[:240].rstrip(".")
