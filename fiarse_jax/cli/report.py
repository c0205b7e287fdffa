"""The end-of-run table: accuracy per capacity on local and global tests."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def summary_table(summary: dict[str, Any]) -> Table:
    """A rich Table of the summary's final evaluation (see ``train.train_and_evaluate``)."""
    final = summary["final"]
    table = Table(title=f"{summary['config']['method']} after {final['round']} rounds "
                        f"({summary['config']['data']['name']}, "
                        f"chance = {1 / summary['num_classes']:.0%})")
    table.add_column("model")
    table.add_column("kept params", justify="right")
    table.add_column("clients", justify="right")
    table.add_column("local test (own clients)", justify="right")
    table.add_column("global test (all clients)", justify="right")
    for label in summary["capacities"]:
        table.add_row(f"capacity {label}", f"{summary['kept_fraction'][label]:.1%}",
                      str(summary["clients_per_level"][label]),
                      f"{final['local_accuracy'][label]:.2%}",
                      f"{final['capacity_global_accuracy'][label]:.2%}")
    table.add_row("full model", "100.0%", "all", "",
                  f"{final['global_accuracy']:.2%}", style="bold")
    return table


def cost_table(summary: dict[str, Any]) -> Table:
    """Per-capacity costs: parameters held, forward FLOPs (and on what), bytes per round."""
    table = Table(title="cost per client of each capacity (one forward pass, one round)")
    for col in ("capacity", "params held", "forward FLOPs", "FLOPs counted on",
                "bytes down", "bytes up"):
        table.add_column(col, justify="left" if col in ("capacity", "FLOPs counted on") else "right")
    for label, c in summary["costs"].items():
        table.add_row(label, f"{c['params_held']:,}", f"{c['flops']:,.0f}", c["flops_basis"],
                      f"{c['bytes_down']:,}", f"{c['bytes_up']:,}")
    return table


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(summary))
    console.print(cost_table(summary))
    console.print(f"wall time {summary['wall_time_s']:.1f} s on {summary['backend']} "
                  f"(strategy {summary['strategy']})")
