"""``mmcli federate``: train a torch head across sites with Flower (FedAvg / FedProx), evaluate it per site and
pooled, and compare it with centralised training on the same patients. Classification (``target``) or survival
(``time`` + ``event``: Cox partial likelihood per site, see :mod:`mmcli.heads.training.federated` for what FedAvg of it
optimises).

Protocol:

* each site is one feature store; the labels CSV covers every site's patients (ids unique across sites);
* per site, a patient-level hold-out split (``test_size``) with the seed, stratified by class (survival: by the
  event indicator);
* federated: every round, each site trains ``local_epochs`` of the head's own loop from the global weights on
  its training patients and returns its weights; the server averages them weighted by the sites' training
  sizes (FedAvg; FedProx adds ``mu/2 ||w - w_global||²`` to the local loss). Only weights move. Preprocessing
  (imputation, standardisation, instance scaling) is fit **per site on its training patients** and stays at the
  site (see :mod:`mmcli.heads.training.federated`; PCA is off); no statistics are shared across sites.
  ``engine="simulation"``
  runs the sites as Flower ``ClientApp`` s in Flower's simulation engine (Ray actors, each loading its own
  store); ``engine="local"`` drives the same strategy and clients in this process (no Ray);
* evaluation (:func:`evaluate_federated`, Flower-free): the final global model predicts each site's test
  patients at that site (with that site's preprocessing; survival: the site's own Breslow baseline); the test
  predictions and labels, not features, are pooled. Metrics with bootstrap CIs per site and pooled
  (:func:`mmcli.heads.evaluation.metrics.summarise`): AUROC etc., or (survival) Harrell's c-index; the pooled c-index
  compares patients across sites too;
* centralised baseline: the same head and hyperparameters trained for ``rounds * local_epochs`` epochs on the
  pooled training patients of all sites (preprocessing fit on the pool), evaluated on the same test patients.

Output folder: ``metrics.json`` (sites, pooled, comparison), ``predictions.csv`` (site, patient_id, y_true,
``prob_<class>`` federated and ``central_prob_<class>``; survival: time, event, ``risk``, ``central_risk``),
``models/<site>/`` (the global weights with that site's preprocessing, loadable by ``mmcli predict``).
"""
from __future__ import annotations

import logging
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmcli import __version__
from mmcli.heads.base import HeadParams
from mmcli.heads.data import Cohort, Source, load_cohort, resolve_sources
from mmcli.heads.evaluation.metrics import FoldPredictions, summarise
from mmcli.heads.nn.torch_base import TorchHead
from mmcli.heads.registry import head_class
from mmcli.heads.targets import Target, build_target, read_labels
from mmcli.heads.training.federated import STRATEGIES, SiteModel, concat_cohorts, make_strategy, site_client
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.io import write_csv, write_json
from mmcli.pipeline.store import open_store

ENGINES = ("simulation", "local")
PREPROCESSING = ("per site: imputation, standardisation and bag instance scaling fit on each site's training "
                 "patients only, never shared (no federated statistics); PCA off")


@dataclass
class Site:
    """What a site's client needs to rebuild its data and model (picklable, for the simulation's actors)."""

    index: int
    name: str
    store: Path
    sources: list[Source]
    train: list[str]
    y_train: np.ndarray
    test: list[str]
    y_test: np.ndarray
    head: str
    params: HeadParams

    def cohort(self, patients: Sequence[str]) -> Cohort:
        return load_cohort(open_store(self.store, "r"), self.sources, list(patients))

    def model(self) -> SiteModel:
        return SiteModel(self.head, self.cohort(self.train), self.y_train, self.params, self.index)


_ACTOR_SITES: dict[tuple[str, int], SiteModel] = {}  # a simulation actor's sites, built once per process


def federate(
    head: str,
    sites: Sequence[str | Path],
    labels: str | Path | pd.DataFrame,
    out: str | Path,
    *,
    target: str | None = None,
    time: str | None = None,
    event: str | None = None,
    rounds: int = 10,
    local_epochs: int = 2,
    strategy: str = "fedavg",
    proximal_mu: float = 0.01,
    test_size: float = 0.3,
    modalities: Sequence[str] | None = None,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    n_boot: int = 1000,
    engine: str = "simulation",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Federated training of ``head`` over the site stores ``sites`` for a classification ``target`` or a
    survival ``time`` + ``event``; writes ``out`` and returns metrics.json."""
    say = log or (lambda _msg: None)
    t0 = _time.perf_counter()
    cls = head_class(head)
    if not issubclass(cls, TorchHead):
        raise InputError(f"--head {head}: federated training moves network weights; use a torch head "
                         "(fusion_mlp, attention_mil).")
    _check_args(sites, rounds, local_epochs, strategy, proximal_mu, test_size, engine)
    params = dict(params or {})
    if "n_components" in cls.Params.fields():
        if params.get("n_components") is not None:
            raise InputError("--param n_components: a PCA fit per site gives the first layer's inputs another "
                             "meaning at every site, so federated training runs without it. Fix: drop it.")
        params["n_components"] = None
    user = cls.user_params(params)  # validated once; every site's head gets this model
    table = read_labels(labels)
    tgt = build_target(table, target=target, time=time, event=event)
    hp = user.for_run(task=tgt.task, n_classes=tgt.n_classes, seed=seed)
    site_list = prepare_sites(cls, sites, tgt, modalities, test_size, seed, head, hp, say)

    weights, fl_version = _run_federated(site_list, rounds, local_epochs, strategy, proximal_mu, engine, say)
    say(f"federated training ({engine}, {strategy}, {rounds} rounds x {local_epochs} local epochs) done")

    meta = {"head": head, "target": target, "time": time, "event": event, "strategy": strategy,
            "proximal_mu": proximal_mu if strategy == "fedprox" else None, "rounds": rounds,
            "local_epochs": local_epochs, "engine": engine, "flower_version": fl_version, "seed": seed,
            "test_size": test_size}
    doc = evaluate_federated(site_list, weights, out, epochs=rounds * local_epochs, n_boot=n_boot, seed=seed,
                             classes=tgt.classes, meta=meta, log=say)
    doc["seconds"] = round(_time.perf_counter() - t0, 1)
    write_json(Path(out) / "metrics.json", doc)
    return doc


def evaluate_federated(site_list: Sequence[Site], weights: Sequence[np.ndarray], out: str | Path, *, epochs: int,
                       n_boot: int = 1000, seed: int = 0, classes: Sequence[str] | None = None,
                       meta: dict[str, Any] | None = None, log: Callable[[str], None] | None = None
                       ) -> dict[str, Any]:
    """Evaluate global ``weights`` at every site and against a centralised model trained ``epochs`` epochs on
    the pooled training patients; writes ``models/<site>/``, ``predictions.csv`` and ``metrics.json`` into
    ``out`` and returns the metrics document. Needs no Flower (the weights may come from any aggregation)."""
    say = log or (lambda _msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = site_list[0]
    cls = head_class(first.head)
    survival = first.params.task == "survival"
    fed_pred, central_pred, cohorts_test = {}, {}, {}
    for s in site_list:
        model = s.model()  # the site's own preprocessing, the global weights
        model.set_weights(weights)
        model.finalise()
        cohorts_test[s.name] = s.cohort(s.test)
        fed_pred[s.name] = model.predict(cohorts_test[s.name])
        model.head.save(out / "models" / s.name)

    train_all = concat_cohorts([s.cohort(s.train) for s in site_list], [s.name for s in site_list])
    y_all = np.concatenate([s.y_train for s in site_list])
    central = cls(first.params.model_copy(update={"epochs": epochs})).fit(train_all, y_all)
    for s in site_list:
        central_pred[s.name] = central.predict(cohorts_test[s.name])
    say("centralised baseline trained on the pooled training patients")

    def metrics_of(preds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
        y = np.concatenate([next(s.y_test for s in site_list if s.name == n) for n in names])
        p = np.concatenate([preds[n] for n in names])
        if survival:  # c-index only: the time-grid metrics need one evaluation grid and baseline across sites
            fold = FoldPredictions(time=y["time"], event=y["event"], risk=p)
            return {"c_index": summarise([fold], n_boot=n_boot, seed=seed)["c_index"]}
        return summarise([FoldPredictions(y=y, probs=p)], n_boot=n_boot, seed=seed)

    names = [s.name for s in site_list]
    per_site = {s.name: {"store": str(s.store), "n_train": len(s.train), "n_test": len(s.test),
                         "federated": metrics_of(fed_pred, [s.name]),
                         "centralised": metrics_of(central_pred, [s.name])} for s in site_list}
    pooled = {"n_test": sum(len(s.test) for s in site_list), "federated": metrics_of(fed_pred, names),
              "centralised": metrics_of(central_pred, names)}
    metric = "c_index" if survival else "auroc"
    f_m, c_m = pooled["federated"][metric], pooled["centralised"][metric]
    within = (None if None in (f_m["mean"], c_m["ci_low"], c_m["ci_high"])
              else bool(c_m["ci_low"] <= f_m["mean"] <= c_m["ci_high"]))
    doc = {
        **(meta or {"head": first.head}), "task": "survival" if survival else "classification",
        "classes": None if survival else list(classes or []),
        "params": {k: v for k, v in first.params.to_json().items() if k not in ("task", "n_classes")},
        "preprocessing": PREPROCESSING, "sites": per_site, "pooled": pooled,
        "comparison": {"metric": metric, "federated": f_m["mean"], "federated_ci": [f_m["ci_low"], f_m["ci_high"]],
                       "centralised": c_m["mean"], "centralised_ci": [c_m["ci_low"], c_m["ci_high"]],
                       "federated_within_centralised_ci": within},
        "mmcli_version": __version__, "created": _time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_csv(out / "predictions.csv", _predictions(site_list, fed_pred, central_pred, classes or []))
    write_json(out / "metrics.json", doc)
    return doc


def _check_args(sites: Sequence[Any], rounds: int, local_epochs: int, strategy: str, mu: float, test_size: float,
                engine: str) -> None:
    if len(sites) < 2:
        raise InputError(f"--sites: federated training needs at least 2 site stores, got {len(sites)}.")
    if rounds < 1:
        raise InputError(f"--rounds must be >= 1, got {rounds}.")
    if local_epochs < 1:
        raise InputError(f"--local-epochs must be >= 1, got {local_epochs}.")
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy {strategy!r}: unknown. Fix: use one of {list(STRATEGIES)}.")
    if not mu >= 0:
        raise InputError(f"--proximal-mu must be >= 0, got {mu}.")
    if not 0 < test_size < 1:
        raise InputError(f"--test-size must be in (0, 1), got {test_size}.")
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r}: unknown. Fix: use one of {list(ENGINES)}.")


def prepare_sites(cls: type[TorchHead], paths: Sequence[str | Path], tgt: Target, modalities: Sequence[str] | None,
                  test_size: float, seed: int, head: str, hp: HeadParams,
                  say: Callable[[str], None] | None = None) -> list[Site]:
    """Resolve every site: its labelled patients, usable for the head, split into train and test (stratified
    by class, or by the event indicator)."""
    from sklearn.model_selection import train_test_split

    pos = {p: i for i, p in enumerate(tgt.patients)}
    seen: dict[str, str] = {}
    out = []
    for k, path in enumerate(paths):
        path = Path(path)
        name = path.name.removesuffix(".zarr").removesuffix(".h5") or f"site{k}"
        if any(s.name == name for s in out):
            name = f"{name}_{k}"
        fs = open_store(path, "r")
        names = (cls.default_modalities(fs.modalities(), fs.tables(), fs.path) if modalities is None
                 else list(modalities))
        sources = resolve_sources(fs, names)
        cohort = load_cohort(fs, sources)
        keep = cohort.presence()
        usable = cls.usable_patients(keep) & np.array([p in pos for p in cohort.patients], dtype=bool)
        patients = [p for p, ok in zip(cohort.patients, usable) if ok]
        clash = sorted(p for p in patients if p in seen)
        if clash:
            raise InputError(f"{path}: patient id(s) {clash[:5]} are also in {seen[clash[0]]}; a patient belongs to "
                             "one site. Fix: give every site's patients distinct ids.")
        seen |= {p: str(path) for p in patients}
        y = np.asarray(tgt.y)[[pos[p] for p in patients]]
        if tgt.task == "survival":
            strata = y["event"].astype(int)
            n_ev = int(strata.sum())
            if len(patients) < 4 or n_ev < 2 or len(patients) - n_ev < 2:
                raise InputError(f"{path}: {len(patients)} labelled patient(s) with features, {n_ev} event(s); a "
                                 "site needs >= 2 events and >= 2 censored patients to split into train and test "
                                 "with events on both sides. Fix: add patients or drop the site.")
        else:
            strata = y
            counts = np.bincount(y, minlength=tgt.n_classes)
            if len(patients) < 4 or (counts[counts > 0] < 2).any() or (counts > 0).sum() < 2:
                raise InputError(f"{path}: {len(patients)} labelled patient(s) with features, class counts "
                                 f"{dict(zip(tgt.classes, counts.tolist()))}; a site needs >= 2 patients of at "
                                 "least 2 classes to split into train and test. Fix: add patients or drop the site.")
        tr, te = train_test_split(np.arange(len(patients)), test_size=test_size, random_state=seed, stratify=strata)
        tr, te = np.sort(tr), np.sort(te)
        out.append(Site(k, name, path.resolve(), list(sources), [patients[i] for i in tr], y[tr],
                        [patients[i] for i in te], y[te], head, hp))
        if say is not None:
            say(f"site {name}: {len(tr)} train / {len(te)} test patients")
    return out


def _run_federated(sites: list[Site], rounds: int, local_epochs: int, strategy: str, mu: float, engine: str,
                   say: Callable[[str], None]) -> tuple[list[np.ndarray], str]:
    """The final global weights and Flower's version."""
    try:
        import flwr
    except ImportError:
        raise InputError("federated training needs Flower, which is not installed. Fix: pip install "
                         "'mmcli[federated]' (or pip install 'flwr[simulation]').") from None
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    logging.getLogger("flwr").setLevel(logging.WARNING)
    strat = make_strategy(strategy, len(sites), local_epochs, mu)
    if engine == "local":
        clients = [site_client(s.model(), local_epochs) for s in sites]
        weights = clients[0].get_parameters({})
        for r in range(1, rounds + 1):
            config = strat.on_fit_config_fn(r) | ({"proximal_mu": mu} if strategy == "fedprox" else {})
            results = []
            for c in clients:
                w, n, m = c.fit(weights, config)
                results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(w), n, m)))
            params, _ = strat.aggregate_fit(r, results, [])
            weights = parameters_to_ndarrays(params)
            say(f"round {r}/{rounds} aggregated")
        return weights, flwr.__version__
    _simulate(sites, strat, rounds, local_epochs)
    if strat.final_weights is None:
        raise RuntimeError("the Flower simulation finished without an aggregated model")
    return strat.final_weights, flwr.__version__


def _simulate(sites: list[Site], strat: Any, rounds: int, local_epochs: int) -> None:
    """Flower's simulation engine: one ``ClientApp`` node per site (Ray actors), the strategy in a ``ServerApp``."""
    from flwr.client import ClientApp
    from flwr.common import Context
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    def client_fn(context: Context) -> Any:
        site = sites[int(context.node_config["partition-id"])]
        key = (str(site.store), site.index)
        if key not in _ACTOR_SITES:  # the site's store is read by its own client only
            _ACTOR_SITES[key] = site.model()
        return site_client(_ACTOR_SITES[key], local_epochs).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strat, config=ServerConfig(num_rounds=rounds))

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(sites), verbose_logging=False,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": logging.ERROR, "log_to_driver": False}})


def _predictions(sites: Sequence[Site], fed: dict[str, np.ndarray], central: dict[str, np.ndarray],
                 classes: Sequence[str]) -> pd.DataFrame:
    frames = []
    for s in sites:
        df = pd.DataFrame({"site": s.name, "patient_id": s.test})
        if s.params.task == "survival":
            df["time"], df["event"] = s.y_test["time"], s.y_test["event"].astype(int)
            df["risk"], df["central_risk"] = fed[s.name], central[s.name]
        else:
            df["y_true"] = [classes[c] for c in s.y_test]
            for k, c in enumerate(classes):
                df[f"prob_{c}"] = fed[s.name][:, k]
            for k, c in enumerate(classes):
                df[f"central_prob_{c}"] = central[s.name][:, k]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
