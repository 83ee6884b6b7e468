"""Federated training of a torch head: a site's local model and training step, its Flower client, the strategies.

* :class:`SiteModel`: a site's copy of the head. Its preprocessing (median imputation and standardisation of
  vectors, instance scaling of bags) is fit on **that site's training patients only** and never leaves the
  site; the network's weights are what Flower moves. PCA is off (``n_components=None``): a PCA basis fit per
  site would give the first layer's inputs a different meaning at every site, so averaging its weights would
  mix unrelated directions.
* :class:`SiteTrainer`: a site's side of a round with the method signatures of Flower's ``NumPyClient``
  (``get_parameters`` / ``fit`` / ``evaluate``) but no Flower import: ``fit`` = ``local_epochs`` of the head's
  own training loop from the global weights (plus FedProx's proximal term ``mu/2 ||w - w_global||²`` when the
  server's config carries ``proximal_mu``), returning the weights and the site's training size (FedAvg's
  weight). :func:`site_client` is the Flower client, which only delegates to it.
* :func:`make_strategy`: Flower's ``FedAvg`` / ``FedProx`` that also keep the last aggregated weights.

Survival (``task="survival"``): the local loss is the head's Cox partial likelihood over the risk sets of the
site's mini-batches. The full partial likelihood does not decompose across sites (a risk set at one site would
need the other sites' risk scores), so FedAvg does not optimise the pooled Cox model: averaging the local
updates, weighted by training size, follows the sum over sites of each site's own partial likelihood, i.e. a
Cox model **stratified by site** (risk sets never cross sites; each site keeps its own baseline hazard, which
:meth:`SiteModel.finalise` fits there). Centralised training with the same head is not the pooled full
likelihood either: its risk sets are its mini-batches, drawn across sites.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from mmcli.heads.base import BreslowBaseline, HeadParams
from mmcli.heads.data import Cohort, ModalityData
from mmcli.heads.nn.losses import cox_ph_loss
from mmcli.heads.nn.torch_base import TorchHead, resolve_device, torch_env
from mmcli.heads.registry import head_class
from mmcli.pipeline.errors import InputError

STRATEGIES = ("fedavg", "fedprox")


class SiteModel:
    """A site's head: preprocessing fit on the site's training patients, weights set from outside."""

    def __init__(self, head: str, X: Cohort, y: np.ndarray, params: HeadParams, site_index: int = 0) -> None:
        h = head_class(head)(params)
        if not isinstance(h, TorchHead):
            raise InputError(f"federated training moves network weights; head {head!r} has none. "
                             "Fix: --head fusion_mlp or attention_mil.")
        if h.dp_epsilon is not None:
            raise InputError("dp_epsilon is not supported by federated training yet. Fix: drop --param dp_epsilon.")
        h._check_task()
        h._check_modalities(X)
        h.spec_ = X.specs()
        h.fitted_patients_ = list(X.patients)
        h.preprocessors_ = {}
        h._fit_preprocessing(X)
        with torch_env(h.seed, h.n_threads):  # the same seed at every site: identical initial weights
            h.module_ = h._build().to(resolve_device(h.device))
        h.privacy_ = None
        self.head, self.X, self.y, self.site_index = h, X, np.asarray(y), site_index

    def get_weights(self) -> list[np.ndarray]:
        return [v.detach().cpu().numpy().copy() for v in self.head.module_.state_dict().values()]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        sd = self.head.module_.state_dict()
        if len(weights) != len(sd):
            raise ValueError(f"got {len(weights)} weight arrays, the model has {len(sd)}")
        self.head.module_.load_state_dict({k: torch.as_tensor(np.asarray(w)) for k, w in zip(sd, weights)})

    def train(self, epochs: int, server_round: int, proximal_mu: float = 0.0) -> None:
        """``epochs`` local passes from the current weights (FedProx term when ``proximal_mu`` > 0)."""
        h = self.head
        dev = resolve_device(h.device)
        seed = [h.seed, self.site_index, server_round]
        with torch_env(int(np.random.SeedSequence(seed).generate_state(1)[0]), h.n_threads):
            opt = torch.optim.AdamW(h.module_.parameters(), lr=h.lr, weight_decay=h.weight_decay)
            penalty: Callable[[], torch.Tensor] | None = None
            if proximal_mu > 0:
                anchor = [p.detach().clone() for p in h.module_.parameters()]

                def penalty() -> torch.Tensor:
                    return 0.5 * proximal_mu * sum(((p - a) ** 2).sum()
                                                   for p, a in zip(h.module_.parameters(), anchor))
            h._train_epochs(self.X, self.y, opt, np.random.default_rng(seed), dev, epochs, penalty)
        h.module_.eval()

    def predict(self, X: Cohort) -> np.ndarray:
        """Class probabilities (n, K), or survival risk (n,), with the current weights and this site's
        preprocessing."""
        return self.head.predict(X)

    def loss(self) -> float:
        """The current weights' loss on this site's training patients: log loss, or (survival) the negative
        Cox partial log-likelihood over the site's whole training set, averaged over its events."""
        out = self.head._predict(self.X)
        if self.head.is_survival:
            return float(cox_ph_loss(torch.as_tensor(out), torch.as_tensor(self.y["time"].astype(np.float64)),
                                     torch.as_tensor(self.y["event"].astype(np.float64))))
        p = np.clip(out[np.arange(len(self.y)), self.y], 1e-12, 1.0)
        return float(-np.log(p).mean())

    def finalise(self) -> SiteModel:
        """After the last round: a survival head's Breslow baseline hazard on this site's training patients
        (the site's stratum; needed to save the model and for its survival curves)."""
        if self.head.is_survival:
            self.head.baseline_ = BreslowBaseline().fit(self.head._predict(self.X), self.y)
        return self


class SiteTrainer:
    """A site's side of a federated round (``NumPyClient``'s signatures, no Flower import)."""

    def __init__(self, model: SiteModel, local_epochs: int) -> None:
        self.model, self.local_epochs = model, local_epochs

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self.model.get_weights()

    def fit(self, parameters: Sequence[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Local training from the global ``parameters``: (new weights, training patients, metrics)."""
        self.model.set_weights(parameters)
        self.model.train(int(config.get("local_epochs", self.local_epochs)), int(config.get("server_round", 0)),
                         float(config.get("proximal_mu", 0.0)))
        return self.model.get_weights(), len(self.model.X), {"site": self.model.site_index}

    def evaluate(self, parameters: Sequence[np.ndarray], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        """Training-set loss of the global weights (the held-out evaluation runs after training)."""
        self.model.set_weights(parameters)
        return self.model.loss(), len(self.model.X), {}


def site_client(model: SiteModel, local_epochs: int) -> Any:
    """A Flower ``NumPyClient`` that delegates to :class:`SiteTrainer` (Flower imported only here)."""
    from flwr.client import NumPyClient

    trainer = SiteTrainer(model, local_epochs)

    class SiteClient(NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return trainer.get_parameters(config)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
                ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            return trainer.fit(parameters, config)

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]
                     ) -> tuple[float, int, dict[str, Any]]:
            return trainer.evaluate(parameters, config)

    return SiteClient()


def make_strategy(name: str, n_sites: int, local_epochs: int, proximal_mu: float,
                  initial: list[np.ndarray] | None = None) -> Any:
    """Flower ``FedAvg`` or ``FedProx`` over all ``n_sites`` every round; ``.final_weights`` holds the last
    aggregate."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg, FedProx

    if name not in STRATEGIES:
        raise InputError(f"--strategy {name!r}: unknown. Fix: use one of {list(STRATEGIES)}.")
    base = FedProx if name == "fedprox" else FedAvg

    class Recording(base):  # type: ignore[misc, valid-type]
        final_weights: list[np.ndarray] | None = None

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} site(s) failed: {failures[:1]}")
            params, metrics = super().aggregate_fit(server_round, results, failures)
            if params is not None:
                self.final_weights = parameters_to_ndarrays(params)
            return params, metrics

    kw: dict[str, Any] = {
        "fraction_fit": 1.0, "fraction_evaluate": 0.0, "min_fit_clients": n_sites, "min_evaluate_clients": 0,
        "min_available_clients": n_sites, "accept_failures": False,
        "on_fit_config_fn": lambda r: {"server_round": r, "local_epochs": local_epochs},
        "fit_metrics_aggregation_fn": lambda _metrics: {},  # the sites' fit metrics are their ids only
        "initial_parameters": ndarrays_to_parameters(initial) if initial is not None else None,
    }
    if name == "fedprox":
        kw["proximal_mu"] = proximal_mu
    return Recording(**kw)


def concat_cohorts(cohorts: Sequence[Cohort], prefixes: Sequence[str]) -> Cohort:
    """Pool site cohorts (same modality specs) into one, patient ids prefixed ``<site>/`` (centralised baseline)."""
    first = cohorts[0]
    specs = first.specs()
    for c in cohorts[1:]:
        if c.specs() != specs:
            raise InputError(f"the sites' modalities differ: {specs} vs {c.specs()}. Fix: extract every site with "
                             "the same encoders.")
    data = {}
    for name, m in first.modalities.items():
        parts = [c.modalities[name] for c in cohorts]
        if m.spec.kind == "bag":
            data[name] = replace(m, present=np.concatenate([p.present for p in parts]),
                                 bags=[b for p in parts for b in (p.bags or [])],
                                 items=[i for p in parts for i in (p.items or [])])
        else:
            data[name] = ModalityData(m.spec, np.concatenate([p.present for p in parts]),
                                      vectors=np.concatenate([p.vectors for p in parts if p.vectors is not None]))
    patients = [f"{s}/{p}" for c, s in zip(cohorts, prefixes) for p in c.patients]
    return Cohort(patients, data, "")
