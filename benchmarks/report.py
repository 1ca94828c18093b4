"""Markdown tables for BENCHMARKS.md from the JSON the benchmark scripts write.

python benchmarks/report.py benchmarks/results/adapter_ops.json [benchmarks/results/train_step.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ADAPTER_METHODS = ("krona", "peft_lokr", "lycoris_lokr", "lycoris_bypass", "lora_r4", "lora_r8")


def adapter_ops_table(data: dict) -> str:
    head = "| case | tokens | A | part | " + " | ".join(ADAPTER_METHODS) + " | PEFT LoKr / Krona | Krona / LoRA r4 |"
    lines = [head, "|" + "---|" * (6 + len(ADAPTER_METHODS))]
    for row in data["rows"]:
        for part in ("update", "layer"):
            ms = {m: row["ms"][f"{m}.{part}"] for m in ADAPTER_METHODS}
            cells = " | ".join(f"{ms[m]:.2f}" for m in ADAPTER_METHODS)
            lines.append(
                f"| {row['case']} | {row['tokens']} | {row['a1']}x{row['a2']} | {part} | {cells} | "
                f"{ms['peft_lokr'] / ms['krona']:.1f}x | {ms['krona'] / ms['lora_r4']:.2f}x |"
            )
    return "\n".join(lines)


def train_step_table(data: dict) -> str:
    lines = [
        "| method | trainable parameters | s/step (fastest) | s/step (median) | saved activations MB |",
        "|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['method']} | {row['trainable_parameters']:,} | {row['seconds_per_step']:.2f} | "
            f"{row['median_seconds_per_step']:.2f} | {row['saved_activation_mb']:.1f} |"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        data = json.loads(Path(path).read_text())
        table = adapter_ops_table(data) if "ms" in data["rows"][0] else train_step_table(data)
        print(f"<!-- {path} -->\n{table}\n\nsummary: `{json.dumps(data['summary'])}`\n")


if __name__ == "__main__":
    main(sys.argv[1:])
