"""Print the options table of a command's page in docs/commands/ from its --help, to paste when
options change (tests/cli/test_docs_options.py says which page misses which option).

    python scripts/option_table.py export
"""

from __future__ import annotations

import sys

import typer.main

from tinybeauty_cli.cli.app import app

g = typer.main.get_command(app)

EXAMPLES = {
    "--rate": "0.3", "--group-rate": "upconv2.conv=0.66", "--keep-float": "upconv2,out", "--arch": "mynets.unet:UNet",
    "--arch-kwargs": "'{\"width\": 16}'", "--for": "ios13,cpu", "--rates": "0.3,0.4", "--palettes": "pal6,pal4",
    "--sparsities": "0.5", "--full-res-rates": "0.66", "--finetune-steps": "750", "--time-budget": "10",
    "--max-drop": "0.2", "--min-fidelity": "42", "--min-psnr": "42", "--exclude": "'upconv*'", "--author": "Ann",
    "--license": "MIT", "--model-version": "1.1", "--seed": "1", "--size": "128", "--fit-palettes": "300",
    "--block-size": "8", "--group-size": "4", "--calib-count": "64", "--limit": "20", "--runs": "50",
    "--warmup": "10", "--threads": "2", "--worst": "5", "--ref": "original.pt", "--csv": "rows.csv",
    "--markdown": "table.md", "--data": "faces/", "--calib": "photos/", "--eval-data": "faces/",
    "--weights": "pal4", "--package-weights": "pal4", "--target": "iOS16", "--compute-units": "cpu-ne",
}
OUTPUT_EXAMPLE = {"prune": "pruned.pt", "quantize": "model_int8.pt", "export": "TinyBeauty.mlpackage",
                  "run": "out/", "optimize": "shipped/", "compare": "pictures/", "apply": "made_up/"}


def example(name, p):
    o = p.opts[0]
    if p.metavar == "" or p.metavar is None and not p.opts[0].startswith("--"):
        return f"`{o}`"
    if o in ("--output", "--out"):
        return f"`{o} {OUTPUT_EXAMPLE[name]}`"
    if o in EXAMPLES:
        return f"`{o} {EXAMPLES[o]}`"
    choices = [str(getattr(c, "value", c)) for c in (p.type_descriptor.choices or ())] if p.type_descriptor.is_choice else []
    if choices:
        d = getattr(p.default, "value", p.default)
        pick = next((c for c in choices if c != d), choices[0])
        return f"`{o} {pick}`"
    return f"`{o} ...`"


def esc(text):
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def table(name):
    c = g.commands[name]
    rows = ["| option | meaning | default | example |", "|---|---|---|---|"]
    for p in c.params:
        if p.param_type_name != "option":
            continue
        opts = " / ".join(f"`{o}`" for o in p.opts + list(p.secondary_opts))
        mv = p.metavar or ""
        d = p.default
        if isinstance(d, bool):
            d = "off" if not d else ("on" if not p.secondary_opts else p.opts[0])
        elif d is None or d == [] or d == ():
            d = "-"
        elif hasattr(d, "value"):
            d = d.value
        if isinstance(getattr(p, "show_default", None), str):
            d = p.show_default
        if p.required:
            d = "required"
        help_ = esc(" ".join((p.help or "").split()))
        if p.hidden:
            help_ += " Hidden: kept so that older scripts run."
        mvs = f" `{mv}`".replace("|", "\\|") if mv else ""
        rows.append(f"| {opts}{mvs} | {help_} | {esc(str(d)) if d != '' else '-'} | {example(name, p).replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in g.commands:
        sys.exit(f"usage: python scripts/option_table.py {{{'|'.join(g.commands)}}}")
    print(table(sys.argv[1]), end="")
