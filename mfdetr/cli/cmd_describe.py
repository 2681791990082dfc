"""``mfdetr describe``: #params▲ and #FLOPs▲ of a mask network, per component (like the paper's tables)."""

from __future__ import annotations

from pathlib import Path

import typer

from mfdetr.errors import MfdetrError


def _preset_spec(name: str):  # -> FeatureSpec | None
    """The registered detector preset's features, or None when the registry lacks ``name``."""
    from mfdetr.masknet.complexity import FeatureSpec

    try:
        from mfdetr.detectors import get_preset

        p = get_preset(name)
    except (MfdetrError, ImportError):
        return None
    return FeatureSpec(
        d_model=p.hidden_dim, level_strides=tuple(p.level_strides), c1_channels=p.c1_channels, num_classes=p.num_classes
    )


def describe_cmd(
    overrides: list[str] = typer.Argument(None, help="masknet overrides, e.g. masknet.box_encoder.layers=3"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML recipe (its masknet table) or a sweep recipe."
    ),
    detector: str | None = typer.Option(
        None, "--detector", help="detector preset (default: the recipe's, else hdetr_r50)."
    ),
    d: int | None = typer.Option(None, "--d", help="transformer width d (overrides the preset)."),
    levels: str | None = typer.Option(None, "--levels", help="encoder level strides, e.g. 8/16/32/64."),
    c1_channels: int | None = typer.Option(None, "--c1-channels", help="channels of C1."),
    input_size: str = typer.Option("800x1200", "--input-size", help="network input HxW for the FLOPs."),
    num_queries: int = typer.Option(100, "--num-queries", "-k", min=1, help="K queries per image."),
    flops: bool | None = typer.Option(
        None, "--flops/--no-flops", help="count FLOPs (default: yes for one config, no for a sweep)."
    ),
    device: str = typer.Option("cpu", "--device", help="where the counting forward runs (cpu, cuda, ...)."),
) -> None:
    """Print #params▲ and #FLOPs▲ per component for one image with K queries (FLOPs: torch's counter)."""
    from mfdetr.config import load_toml
    from mfdetr.masknet import build_masknet
    from mfdetr.masknet.complexity import describe, params_by_component, parse_levels, parse_size, resolve_feature_spec
    from mfdetr.masknet.config import load_masknet_config, recipe_detector

    from mfdetr.devices import resolve_device

    device = str(resolve_device(device))
    ovs = list(overrides or [])
    data = load_toml(config) if config is not None else {}
    name = detector or recipe_detector(data)
    explicit = d is not None and levels is not None and c1_channels is not None
    if name is None and not explicit:
        name = "hdetr_r50"
    spec, source = resolve_feature_spec(
        preset=_preset_spec(name) if name else None,
        name=name,
        d_model=d,
        levels=parse_levels(levels) if levels else None,
        c1_channels=c1_channels,
        input_hw=parse_size(input_size),
    )
    typer.echo(f"features: {source}")
    if config is not None and isinstance(data.get("variants"), list):
        from mfdetr.engine.sweep import load_sweep, run_overrides, variant_masknet_config

        sweep = load_sweep(config)
        rows = [(v, variant_masknet_config(sweep, v, run_overrides(ovs))) for v in sweep.variants]
        count_flops = bool(flops)
        head = f"{'variant':<28}{'#params▲':>12}{'(M)':>8}{'paper(M)':>10}{'Δ%':>8}"
        if count_flops:
            head += f"{'GMACs':>9}{'paper G':>9}"
        typer.echo(head)
        for row, mcfg in rows:
            model = build_masknet(
                mcfg, d_model=spec.d_model, level_strides=spec.level_strides, c1_channels=spec.c1_channels
            )
            n = params_by_component(model)["total"]
            pm = row.paper.get("params_m")
            delta = f"{100 * (n / 1e6 - pm) / pm:+.1f}" if isinstance(pm, int | float) and pm else ""
            line = f"{row.name:<28}{n:>12,}{n / 1e6:>8.2f}{pm if pm is not None else '':>10}{delta:>8}"
            if count_flops:
                rep = describe(model, spec, num_queries=num_queries, device=device)
                pg = row.paper.get("flops_g", "")
                line += f"{rep.flops['total'] / 2e9:>9.2f}{pg:>9}"
            typer.echo(line)
        return
    cfg = load_masknet_config(None, ovs) if config is None else load_masknet_config(config, ovs)
    model = build_masknet(cfg, d_model=spec.d_model, level_strides=spec.level_strides, c1_channels=spec.c1_channels)
    if flops is False:
        for k, v in params_by_component(model).items():
            typer.echo(f"{k:<15}{v:>12,}{v / 1e6:>8.2f} M")
        return
    typer.echo(describe(model, spec, num_queries=num_queries, device=device).format())


def register(app: typer.Typer) -> None:
    app.command("describe")(describe_cmd)
