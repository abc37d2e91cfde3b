"""The files that make a run readable, all written by process 0 only.

| file | written by |
|---|---|
| `metrics.jsonl` | `MetricsLog(run_dir).write(step, metrics)`, one flushed line per step |
| `metrics.png` | `plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")`; `plot_counts` where a stage has no steps |
| `summary.md`, `summary.json` | `write_summary(run_dir, stage, metrics, headline, tables)` |
| `config.yaml` | `save_resolved_config(run_dir, cfg)`; `short_config(cfg)` for the console |
"""

from posttrain.reporting._files import write_atomically
from posttrain.reporting._metrics_log import METRICS_FILE, MetricsLog, json_value, read_metrics
from posttrain.reporting._plots import numeric_series, plot_counts, plot_metrics
from posttrain.reporting._run_config import (
    CONFIG_FILE,
    plain_config,
    save_resolved_config,
    short_config,
)
from posttrain.reporting._summary import (
    SUMMARY_JSON,
    SUMMARY_MD,
    format_value,
    markdown_table,
    write_summary,
)

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "MetricsLog",
    "format_value",
    "json_value",
    "markdown_table",
    "numeric_series",
    "plain_config",
    "plot_counts",
    "plot_metrics",
    "read_metrics",
    "save_resolved_config",
    "short_config",
    "write_atomically",
    "write_summary",
]
