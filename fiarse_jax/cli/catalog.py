"""``fiarse-jax list``: what the registries hold, each entry with its options and defaults.

Read from the registries themselves (``policies.METHODS``, ``models.MODELS``,
``data.DATASETS``, ``aggregators.AGGREGATORS``, ``attacks.KINDS``), so a method, model or
dataset registered by a user shows up too.
"""
from __future__ import annotations

import dataclasses
import inspect

from fiarse_jax import models, policies
from fiarse_jax.data.registry import DATASETS
from fiarse_jax.robust import aggregators, attacks

#: one line per attack kind (``config.attack.kind``)
ATTACKS = {
    "none": "honest clients (a clean twin of an attacked run)",
    "sign_flip": "send −delta",
    "scale": "send attack.scale × delta",
    "gaussian": "send Gaussian noise of std attack.noise_std",
    "free_rider": "send a zero update",
    "nan": "send non-finite values",
    "alie": "a little is enough: coordinated, inside the honest spread",
    "adaptive": "coordinated, scaled to pass the server's screens",
    "label_flip": "train on flipped labels (acts on the data)",
}


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "—"


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _model_options(cls) -> dict:
    skip = {"parent", "name", "num_classes"}
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in skip and f.default is not dataclasses.MISSING}


def _rule_options(fn) -> dict:
    sig = inspect.signature(fn)
    return {n: (p.default if p.default is not inspect.Parameter.empty else "required")
            for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def sections() -> dict[str, list[tuple[str, str, str]]]:
    """``{section: [(name, one line, options with defaults), ...]}``."""
    return {
        "methods (config.method; options under config.<method>)": [
            (n, s.description or _first_line(s.builder), _fmt(policies.method_options(n)))
            for n, s in policies.METHODS.items()],
        "models (config.model.name; its fields under config.model)": [
            (n, _first_line(c), _fmt(_model_options(c))) for n, c in models.MODELS.items()],
        "datasets (config.data.name)": [
            (n, s.description, ", ".join(s.options) or "—") for n, s in DATASETS.items()],
        "aggregation rules (config.server.aggregator; options under config.server.<rule>)": [
            (n, _first_line(f), _fmt(_rule_options(f))) for n, f in aggregators.AGGREGATORS.items()],
        "attacks (config.attack.kind)": [
            (n, ATTACKS.get(n, ""), "") for n in attacks.KINDS + ("label_flip",)],
    }


def text() -> str:
    """The listing as plain text, one block per section."""
    out = []
    for title, rows in sections().items():
        out.append(title + ":")
        width = max(len(n) for n, _, _ in rows)
        for name, line, opts in rows:
            out.append(f"  {name:<{width}}  {line}")
            if opts:
                out.append(f"  {'':<{width}}    options: {opts}")
        out.append("")
    return "\n".join(out)
