"""The `dtrain` command: config, data, train, pipeline, pairs, submit, sample, eval, eval-regions, eval-edits,
recogniser, export, serve, bench."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from dtrain.config import load_config, to_yaml
from dtrain.diffusion.samplers import SAMPLERS as SAMPLER_NAMES
from dtrain.errors import DtrainError


class CheckpointArg(click.ParamType):
    """A local checkpoint, run directory or exported file that exists, or an object-store URI."""
    name = "checkpoint"

    def convert(self, value, param, ctx):
        from dtrain.storage import is_uri

        if is_uri(value) or Path(value).exists():
            return value
        self.fail(f"'{value}': no such file or directory", param, ctx)


CHECKPOINT = CheckpointArg()


class UserError(click.ClickException):
    """Bad input from the user: one clear line, exit code 2, no traceback."""
    exit_code = 2


class Commands(click.Group):
    """The command group: dtrain's own errors (bad config, data, checkpoint, key, ...) from any command
    end it with their one-line message and exit status 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DtrainError as e:
            raise UserError(str(e)) from None


def _config(path, overrides):
    """A config checked by its section rules and by its stage kind's."""
    from dtrain.train.stages import check_stage

    cfg = load_config(path, overrides)
    check_stage(cfg)
    return cfg


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """dtrain: train and serve diffusion models with Ray Train, DeepSpeed and Ray Serve."""
    from dtrain.secrets import unseal_into_environ

    unseal_into_environ()  # a job from `dtrain submit`: its sealed secrets, before anything reads them


@main.command("config")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def config_cmd(config, overrides):
    """Print the resolved CONFIG (YAML + key=value overrides) and exit."""
    click.echo(to_yaml(_config(config, overrides)), nl=False)


@main.group()
def data():
    """Build WebDataset shards from bundled data."""


@data.command("digits")
@click.option("--out", default="data/digits", show_default=True, type=click.Path(file_okay=False))
@click.option("--image-size", default=8, show_default=True, help="Side in pixels (the originals are 8x8; larger is upsampled).")
@click.option("--train-shards", default=4, show_default=True)
def data_digits(out, image_size, train_shards):
    """scikit-learn's handwritten digits (no download) -> train and validation shards."""
    from dtrain.data.digits import write_digits

    shards = write_digits(out, image_size=image_size, train_shards=train_shards)
    click.echo(f"wrote {len(shards['train'])} train and {len(shards['val'])} validation shards to {out}")


@data.command("gmm")
@click.option("--spec", default="configs/gmm/default.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Mixture as YAML/JSON: means [K, D], covs [K, D, D], weights [K]; class label = component index.")
@click.option("--out", default="data/gmm", show_default=True, type=click.Path(file_okay=False))
@click.option("--n-train", default=20_000, show_default=True)
@click.option("--n-val", default=2_000, show_default=True)
@click.option("--shards", "train_shards", default=4, show_default=True, help="Train shards (validation: one).")
@click.option("--seed", default=0, show_default=True)
def data_gmm(spec, out, n_train, n_val, train_shards, seed):
    """Samples of a Gaussian mixture with exact ground truth (dtrain.data.mixture) -> train and validation
    shards; each point is stored as latent.npy [D, 1, 1] and the spec is copied to OUT/gmm.json."""
    from dtrain.data.gmm import load_spec, write_gmm

    gmm = load_spec(spec)
    shards = write_gmm(gmm, out, n_train=n_train, n_val=n_val, train_shards=train_shards, seed=seed)
    click.echo(f"wrote {len(shards['train'])} train and {len(shards['val'])} validation shards to {out}; train with "
               f"model.arch=mlp model.in_channels={gmm.dim} model.image_size=1 model.patch_size=1 "
               f"model.num_classes={gmm.num_components}")


@data.command("shapes")
@click.option("--out", default="data/shapes", show_default=True, type=click.Path(file_okay=False))
@click.option("--image-size", default=32, show_default=True, help="Side in pixels, 16 to 64.")
@click.option("--train-shards", default=8, show_default=True)
@click.option("--per-shard", default=1000, show_default=True, help="Samples per shard (val and heldout too).")
@click.option("--val", default=2000, show_default=True, help="Validation scenes (the training distribution).")
@click.option("--heldout", default=1000, show_default=True, help="Scenes holding a held-out composition.")
@click.option("--max-objects", default=4, show_default=True, help="Objects per scene: 1 to this many.")
@click.option("--seed", default=0, show_default=True)
@click.option("--address", default=None, help="Ray cluster address (default: start a local cluster).")
def data_shapes(out, image_size, train_shards, per_shard, val, heldout, max_objects, seed, address):
    """Procedural RGB scenes of coloured shapes with captions and exact objects, in img2dataset's
    layout (png, txt, json per sample; cls = the first object's colour-shape class), one Ray task per
    shard; OUT/dataset.json lists the world and its held-out compositions."""
    from dtrain.data.shapes import NUM_CLASSES, ShapesSpec, write_shapes
    from dtrain.runtime import ensure_ray

    spec = ShapesSpec(image_size, train_shards, per_shard, val, heldout, max_objects, seed)
    spec.check()
    ensure_ray(address)
    shards = write_shapes(out, spec)
    click.echo(f"wrote {', '.join(f'{len(v)} {k}' for k, v in shards.items())} shards to {out}; a class-conditional "
               f"model: model.in_channels=3 model.image_size={image_size} model.num_classes={NUM_CLASSES}")


@data.command("encode")
@click.argument("shards")
@click.option("--vae", "vae_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local diffusers AutoencoderKL directory (from save_pretrained); nothing is downloaded.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the latent shards.")
@click.option("--batch-size", default=64, show_default=True, help="Images per VAE forward pass.")
@click.option("--scale", default=None, type=float, help="Latent scaling factor (default: the VAE config's).")
@click.option("--address", default=None, help="Ray cluster address (default: start a local cluster).")
def data_encode(shards, vae_dir, out, batch_size, scale, address):
    """Encode image SHARDS (e.g. 'data/digits/train-{000000..000003}.tar') into VAE latent shards, as a
    Ray Data job over every CPU of the cluster. Train on them with model.in_channels = the latent channels."""
    import json

    from dtrain.data.latents import encode_shards

    paths = encode_shards(shards, vae_dir, out, batch_size=batch_size, scaling_factor=scale, address=address)
    info = json.loads((Path(out) / "latents.json").read_text())
    click.echo(f"wrote {len(paths)} latent shards ({info['count']} samples, shape {info['shape']}) to {out}")


@data.command("embed")
@click.argument("shards")
@click.option("--encoder", required=True, help="Frozen transformers text encoder: a local directory (CLIP or T5 text "
              "tower with its tokenizer) or a hub id; the same as the model's model.text_encoder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the embedded shards.")
@click.option("--max-tokens", default=24, show_default=True, help="Caption length in tokens: the model's model.max_tokens.")
def data_embed(shards, encoder, out, max_tokens):
    """Precompute a frozen text encoder's caption embeddings into captioned SHARDS (each sample keeps its
    fields and gains emb.npy), so training a text model over that encoder skips running it."""
    from dtrain.data.text_encoders import embed_shards

    paths = embed_shards(shards, encoder, out, max_tokens)
    click.echo(f"wrote {len(paths)} shards with caption embeddings of {encoder} ({max_tokens} tokens) to {out}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def train(config, overrides):
    """Train CONFIG on a Ray cluster (a local one unless scaling.address is set). Rerun to resume."""
    from dtrain.train.driver import Interrupted, fit

    cfg = _config(config, overrides)
    try:
        final = fit(cfg)
    except Interrupted as e:
        click.echo(f"interrupted by {e.signal_name}: saved step {e.step} to {e.checkpoint}\n"
                   f"rerun the same command to resume from it")
        sys.exit(130)
    click.echo(f"final checkpoint: {final}")


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--no-eval", is_flag=True, help="Train the stages only.")
def pipeline(pipeline_file, overrides, no_eval):
    """Run the stages of PIPELINE_FILE in order (pretrain -> pairs -> reflow ...), each a Ray Train run
    started from the one before, then evaluate every stage. OVERRIDES (key=value) apply to every stage.
    Rerun to resume at the first unfinished stage."""
    from dtrain.train.driver import Interrupted
    from dtrain.train.pipeline import load_pipeline, run_pipeline

    p = load_pipeline(pipeline_file, overrides)
    try:
        state = run_pipeline(p)
    except Interrupted as e:
        click.echo(f"interrupted by {e.signal_name}: saved step {e.step} to {e.checkpoint}\n"
                   f"rerun the same command to resume from it")
        sys.exit(130)
    for name, st in state["stages"].items():
        click.echo(f"{name:10} {st['kind']:19} {st['checkpoint']}")
    if not no_eval:
        from dtrain.eval.pipeline import evaluate_pipeline

        evaluate_pipeline(p, state, log=click.echo)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Data-parallel ranks (default: the config's scaling.num_workers).")
@click.option("--device", "device_name", default=None,
              help="Check the memory against a named GPU: a100-40gb, a100-80gb, h100-80gb, h200.")
@click.option("--device-memory", type=float, default=None, help="Check the memory against this many GiB per rank.")
@click.option("--json", "as_json", is_flag=True)
def plan(config, overrides, workers, device_name, device_memory, as_json):
    """A dry run of CONFIG (a training config, or a pipeline file: each stage) with key=value OVERRIDES:
    the model's parameters, tokens and FLOPs, the batch, the DeepSpeed config and the memory of one rank
    (model states, EMA, activations with and without checkpointing). Nothing trains; no GPU or Ray needed.
    With --device or --device-memory, a run that does not fit is refused (exit 2) with what would fit."""
    import json

    from dtrain.plan import PlanError, device_gib, plan as make_plan, refusal, render

    report = make_plan(config, overrides, workers, device_gib(device_name, device_memory))
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    reason = refusal(report)
    if reason:
        raise PlanError(reason)


@main.command()
@click.argument("teacher", type=CHECKPOINT)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory (or s3://, gs:// URI) for the pair shards.")
@click.option("--count", default=2048, show_default=True, help="Pairs in all (a multiple of --per-shard).")
@click.option("--per-shard", default=256, show_default=True, help="Pairs per shard: one Ray task each.")
@click.option("--steps", default=32, show_default=True, help="Teacher ODE steps.")
@click.option("--sampler", default="heun", show_default=True, type=click.Choice(SAMPLER_NAMES))
@click.option("--guidance", default=1.0, show_default=True, help="Teacher CFG scale (1 = off).")
@click.option("--address", default=None, help="Ray cluster address (default: a local cluster).")
def pairs(teacher, out, count, per_shard, steps, sampler, guidance, address):
    """Reflow pairs (noise, label or caption, sample) from TEACHER's ODE as shards in OUT, one Ray task per shard;
    rerun to finish an interrupted job. Train on them with stage.name=reflow data.train_shards=..."""
    from dtrain.runtime import ensure_ray
    from dtrain.train.pairs import generate_pairs, shard_urls

    ensure_ray(address)
    paths = generate_pairs(teacher, out, count, per_shard, steps, sampler, guidance)
    click.echo(f"wrote {len(paths)} pair shards ({count} pairs): data.train_shards={shard_urls(out, count, per_shard)}")


@main.command()
@click.option("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
@click.option("--working-dir", default=".", show_default=True, type=click.Path(file_okay=False, exists=True))
@click.option("--runtime-env", "runtime_env_file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="A runtime_env YAML (e.g. cluster/runtime_env.yaml) under the project's working_dir.")
@click.option("--pipeline", "is_pipeline", is_flag=True, help="CONFIG is a pipeline file: run `dtrain pipeline`.")
@click.option("--no-follow", is_flag=True, help="Return once submitted instead of streaming the logs.")
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.argument("overrides", nargs=-1)
def submit(address, working_dir, runtime_env_file, is_pipeline, no_follow, config, overrides):
    """Submit `dtrain train CONFIG` (or `dtrain pipeline CONFIG`) as a Ray job, stream its logs, exit with
    its status. Secrets set here (WANDB_API_KEY, DTRAIN_SERVE_TOKENS, AWS_*) reach the job as runtime_env
    env_vars and are never printed."""
    from dtrain.submit import SubmitError, submit as submit_job

    if is_pipeline:  # a bad config fails here, not on the cluster
        from dtrain.train.pipeline import load_pipeline

        load_pipeline(config, list(overrides))
    else:
        _config(config, overrides)
    try:
        job_id, status = submit_job(address, config, list(overrides), working_dir, follow=not no_follow,
                                    command="pipeline" if is_pipeline else "train",
                                    runtime_env_file=runtime_env_file)
    except (ValueError, SubmitError) as e:
        raise UserError(f"submit: {e}") from None
    click.echo(f"job {job_id}: {status.value}")
    if status.value in ("FAILED", "STOPPED"):
        sys.exit(1)


@main.command()
@click.argument("shards")
@click.option("--world", "world_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A `dtrain data shapes` directory whose renders are FD's reference (default: the generator's defaults).")
@click.option("--limit", default=None, type=int, help="Score only the first N samples.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def score(shards, world_dir, limit, as_json):
    """Score images of the shapes world against the captions they were asked for: SHARDS in
    img2dataset's layout (png or jpg + txt per sample), read back by the world's recogniser into
    objects. Attribute (shape, colour, place), count and binding accuracy, and FD in the recogniser's
    features against as many real renders, with its noise floor and a bootstrap interval."""
    import json

    from dtrain.data.shapes import read_meta
    from dtrain.eval.shapes import score_shards

    try:
        r = score_shards(shards, read_meta(world_dir) if world_dir else None, limit=limit)
    except ValueError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    place = "-" if r["place_acc"] is None else f"{r['place_acc']:.3f}"
    click.echo(f"n {r['n']} ({r['objects']} objects asked): shape {r['shape_acc']:.3f} colour {r['colour_acc']:.3f} "
               f"place {place} count {r['count_acc']:.3f} binding {r['binding_acc']:.3f}\n"
               f"fd {r['fd']:.3f} [{r['fd_ci'][0]:.3f}, {r['fd_ci'][1]:.3f}], real vs real at the same n "
               f"{r['noise_floor_fd']:.3f} (recogniser {r['recogniser']})")


@main.command()
@click.argument("checkpoint", type=CHECKPOINT)
@click.option("--out", default="samples.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--classes", default=None, help="Comma-separated class labels (default: all).")
@click.option("--prompt", "prompts", multiple=True, help="Text model: a prompt, one row of the grid (repeatable).")
@click.option("--negative-prompt", default="", help="Text model: what guidance steers away from (default: the empty prompt).")
@click.option("--per-class", default=None, type=int, help="Samples per class (default: sample.per_class).")
@click.option("--steps", default=None, type=int, help="Solver steps (default: sample.steps).")
@click.option("--sampler", default=None, type=click.Choice(SAMPLER_NAMES), help="ODE solver (default: sample.sampler).")
@click.option("--guidance", default=None, type=float, help="CFG scale (default: sample.guidance).")
@click.option("--seed", default=0, show_default=True)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32", "fp16"]),
              help="Network precision; auto = bf16 only where this CPU runs it natively.")
@click.option("--regions", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Region control: a JSON or YAML file {background: {prompt | class_label}, objects: [{prompt | "
                   "class_label, box: [x0, y0, x1, y1]}]} (boxes in image fractions, at most 8 objects); "
                   "--per-class images of it in one row.")
@click.option("--region-method", default="multidiffusion", show_default=True,
              type=click.Choice(["multidiffusion", "attention"]),
              help="With --regions: blend per-region predictions in their boxes (one evaluation per region), or "
                   "restrict each object's cross-attention to its box (text models, one evaluation).")
def sample(checkpoint, out, classes, prompts, negative_prompt, per_class, steps, sampler, guidance, seed, precision,
           regions, region_method):
    """Write a grid of samples from CHECKPOINT (or a run dir): a row per class, or for a text model a row
    per --prompt with the prompt written beside it; with --regions a row of images of one region spec. A
    checkpoint trained on VAE latents is decoded through its VAE."""
    import torch

    from dtrain.checkpoint import load_model, read_meta, read_tokenizer
    from dtrain.diffusion.samplers import nfe
    from dtrain.generation import conditions, render
    from dtrain.images import save_captioned_grid, save_grid
    from dtrain.precision import choose

    net, cfg = load_model(checkpoint)
    m, s = cfg.model, cfg.sample
    per_class, steps, sampler = per_class or s.per_class, steps or s.steps, sampler or s.sampler
    guidance = s.guidance if guidance is None else guidance
    choice = choose(precision, "cpu")
    negative = None
    if regions:
        return _sample_regions(checkpoint, net, cfg, out, classes, prompts, negative_prompt, per_class, steps, sampler,
                               guidance, seed, choice, regions, region_method)
    if m.conditioning == "text":
        if classes is not None or not prompts:
            raise UserError("this is a text model: give --prompt (repeatable), not --classes")
        rows = list(prompts)
        tokenizer = read_tokenizer(checkpoint)
        cond = conditions(cfg, tokenizer, [p for p in rows for _ in range(per_class)])
        negative = conditions(cfg, tokenizer, [negative_prompt] * len(cond)) if negative_prompt else None
    else:
        if prompts:
            raise UserError("--prompt needs a text model (model.conditioning=text); this one takes --classes")
        rows = list(range(m.num_classes)) if classes is None else [int(c) for c in classes.split(",")]
        bad = [c for c in rows if not 0 <= c < m.num_classes]
        if bad:
            raise UserError(f"--classes: {bad} outside 0..{m.num_classes - 1}")
        cond = torch.tensor(rows).repeat_interleave(per_class)
    x = render(net, cfg, read_meta(checkpoint), cond, [seed + i for i in range(len(cond))], steps, guidance,
               choice.precision, sampler, negative=negative)
    factor = 4 if x.shape[-1] < 64 else 1  # upscale only tiny images (8-16 px digits) so they are visible
    written = save_captioned_grid(x, out, rows, per_class, factor) if m.conditioning == "text" else \
        save_grid(x, out, ncol=per_class, factor=factor)
    click.echo(f"wrote {written} ({len(rows)} {'prompts' if m.conditioning == 'text' else 'classes'} x {per_class}, "
               f"{sampler} {steps} steps, {nfe(sampler, steps, guidance)} network evaluations per image, "
               f"{choice.precision}: {choice.reason})")


def _sample_regions(checkpoint, net, cfg, out, classes, prompts, negative_prompt, per_class, steps, sampler, guidance,
                    seed, choice, regions, method):
    """`dtrain sample --regions FILE`: per_class images of the file's region spec in one row."""
    from dtrain.checkpoint import read_meta, read_tokenizer
    from dtrain.images import save_grid
    from dtrain.regions import load_regions, region_nfe, render_regions

    if classes is not None or prompts:
        raise UserError("--regions: the file holds the prompts or class labels; give no --classes or --prompt")
    spec = load_regions(regions)  # a RegionError (a DtrainError) names the field and ends the command
    text = cfg.model.conditioning == "text"
    x = render_regions(net, cfg, read_meta(checkpoint), spec, [seed + i for i in range(per_class)], steps, guidance,
                       choice.precision, sampler, method, tokenizer=read_tokenizer(checkpoint) if text else None,
                       negative=negative_prompt if text and negative_prompt else None)
    written = save_grid(x, out, ncol=per_class, factor=4 if x.shape[-1] < 64 else 1)
    click.echo(f"wrote {written} ({per_class} images, {1 + len(spec.objects)} regions by {method}, {sampler} {steps} "
               f"steps, {region_nfe(spec, sampler, steps, guidance, method)} network evaluations per image, "
               f"{choice.precision}: {choice.reason})")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); a UserError naming the option for anything else or a value below 1."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option}: '{text}' is not a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise UserError(f"{option}: every value must be >= 1, got {list(values)}")
    return values


@main.command("eval")
@click.argument("checkpoint", type=CHECKPOINT)
@click.option("--steps", "steps_list", default="1,2,4,8,16,50", show_default=True,
              help="Comma-separated step counts (Euler/DDIM NFE = steps, Heun 2 steps - 1; doubled with guidance).")
@click.option("--samplers", default="euler", show_default=True, help=f"Comma-separated samplers: {', '.join(SAMPLER_NAMES)}.")
@click.option("--samples-per-class", default=None, type=int, help="Default: as many as the noise-floor half of the real set.")
@click.option("--prompts", default=400, show_default=True, type=int,
              help="Shapes world, text model: evaluation prompts (plus a quarter as many held-out ones).")
@click.option("--val-shards", default=None, help="Reference shards (default: data.val_shards of the checkpoint's config).")
@click.option("--guidance", default=None, type=float, help="CFG scale (default: sample.guidance).")
@click.option("--seed", default=0, show_default=True)
@click.option("--feature-net", default="digits", show_default=True,
              help="digits (trained here, cached) | inception (local weights only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@click.option("--plot", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: FD against NFE; mixtures: velocity error against t; with --audit the class shares.")
@click.option("--audit", is_flag=True, help="Bias audit: null-label samples' classes against the training distribution.")
@click.option("--address", default=None, help="Ray cluster to sample on (default: a local one).")
@click.option("--in-process", is_flag=True, help="Sample in this process instead of as Ray tasks (same figures).")
def eval_cmd(checkpoint, steps_list, samplers, samples_per_class, prompts, val_shards, guidance, seed, feature_net,
             as_json, plot, audit, address, in_process):
    """Sample quality of CHECKPOINT (or a run dir) against NFE. Digits: Frechet distance in a digits
    classifier's feature space with a noise floor, class accuracy of conditional samples against real
    digits, and trajectory straightness. Gaussian-mixture data (`dtrain data gmm`): exact component
    shares, likelihood and velocity error against the analytic field. Shapes world (`dtrain data
    shapes`): attribute, count and binding accuracy read back by the world's recogniser, FD in its
    features with a noise floor and a bootstrap interval; a class model asked for every class, a text
    model for fixed evaluation prompts and, apart, held-out compositions (per number of objects too).
    Fixed seeds and sample counts, so reruns give the same figures."""
    import json

    from dtrain.checkpoint import read_config
    from dtrain.eval.digits import evaluate_checkpoint, format_table, plot_fd_vs_nfe
    from dtrain.eval.mixture import evaluate_mixture_checkpoint, mixture_spec, plot_velocity_error
    from dtrain.eval.mixture import format_table as mixture_table

    steps = _int_list(steps_list, "--steps")
    sampler_list = samplers.split(",")
    if not set(sampler_list) <= set(SAMPLER_NAMES):
        raise UserError(f"--samplers: {sorted(set(sampler_list) - set(SAMPLER_NAMES))} not among {', '.join(SAMPLER_NAMES)}")
    if not in_process:
        from dtrain.runtime import ensure_ray

        ensure_ray(address, log_to_driver=not as_json)
    try:
        if audit:
            from dtrain.eval.audit import audit_checkpoint, format_audit, plot_audit

            result = audit_checkpoint(checkpoint, steps=max(steps), seed=seed)
            click.echo(json.dumps(result, indent=2) if as_json else format_audit(result))
            if plot:
                plot_audit(result, plot)
            return
        from dtrain.eval.shapes import evaluate_shapes_checkpoint, shapes_world
        from dtrain.eval.shapes import format_table as shapes_table

        if shapes_world(val_shards or read_config(checkpoint).data.val_shards):  # read back by the recogniser
            result = evaluate_shapes_checkpoint(checkpoint, steps, samples_per_class=samples_per_class or 10,
                                                seed=seed, guidance=guidance, val_shards=val_shards,
                                                samplers=sampler_list, use_ray=not in_process,
                                                log=None if as_json else click.echo, n_prompts=prompts)
            click.echo(json.dumps(result, indent=2) if as_json else shapes_table(result))
            return
        if mixture_spec(val_shards or read_config(checkpoint).data.val_shards):  # exact metrics on a mixture
            result = evaluate_mixture_checkpoint(checkpoint, steps, val_shards=val_shards, seed=seed)
            click.echo(json.dumps(result, indent=2) if as_json else mixture_table(result))
            if plot:
                plot_velocity_error(result, plot)
            return
        result = evaluate_checkpoint(checkpoint, steps, samples_per_class=samples_per_class, val_shards=val_shards,
                                     seed=seed, guidance=guidance, feature_net=feature_net,
                                     log=None if as_json else click.echo, samplers=sampler_list,
                                     use_ray=not in_process)
    except ValueError as e:  # bad inputs the metrics refuse (dtrain's own errors are caught by Commands)
        raise UserError(str(e)) from None
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    path = plot_fd_vs_nfe(result, plot) if plot else None
    if path and not as_json:
        click.echo(f"wrote {path}")
    from dtrain.checkpoint import resolve
    from dtrain.tracking import log_eval

    ckpt = resolve(checkpoint)
    if ckpt.is_dir() and log_eval(ckpt, read_config(ckpt), result, {"fd_vs_nfe": path} if path else None) \
            and not as_json:
        click.echo(f"logged to the W&B run of {ckpt.parent.name}")


def _measured_model(checkpoint):
    """(net, cfg, meta, tokenizer, the recogniser) of a text pixel model of the shapes world, or a UserError."""
    from dtrain.checkpoint import load_model, read_meta, read_tokenizer
    from dtrain.eval.recogniser import shapes_recogniser

    net, cfg = load_model(checkpoint)
    meta = read_meta(checkpoint)
    if cfg.model.conditioning != "text" or meta.get("latents") or cfg.model.in_channels != 3:
        raise UserError("this measures a text model of the shapes world in pixels (model.conditioning=text, RGB, "
                        "no latents): objects are asked for by their captions and read back by the recogniser")
    try:
        return net, cfg, meta, read_tokenizer(checkpoint), shapes_recogniser(cfg.model.image_size)
    except ValueError as e:
        raise UserError(str(e)) from None


def _write_json(path, result: dict) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


@main.command("eval-regions")
@click.argument("checkpoint", type=CHECKPOINT)
@click.option("--n", default=48, show_default=True, type=click.IntRange(min=1), help="Scenes per object count.")
@click.option("--counts", default="2,3,4", show_default=True, help="Comma-separated object counts (1 to 4).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampler steps (default: sample.steps).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: sample.guidance).")
@click.option("--sampler", default=None, type=click.Choice(SAMPLER_NAMES), help="Default: sample.sampler.")
@click.option("--methods", default="plain,multidiffusion,attention", show_default=True,
              help="Comma-separated: plain (the scene's caption), multidiffusion, attention.")
@click.option("--background", default="empty", show_default=True, type=click.Choice(["empty", "caption"]),
              help="The background region's prompt: the empty prompt, or the scene's caption.")
@click.option("--no-place", is_flag=True, help="Object prompts without their place ('a red circle').")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here.")
@click.option("--grid", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: two scenes per count, the real render and each method's image.")
def eval_regions(checkpoint, n, counts, steps, guidance, sampler, methods, background, no_place, seed, as_json, out,
                 grid):
    """Region control on the shapes world: scenes of 2 to 4 objects sampled from their caption and from
    region specs (each object's own caption in its box) by multidiffusion and regional attention at the
    same seeds, read back by the recogniser: binding, count and place accuracy per object count, the gain
    over the plain caption, NFE and seconds per image."""
    import json

    from dtrain.eval.regions import evaluate_regions, format_table, save_region_grid
    from dtrain.precision import machine

    net, cfg, meta, tok, rec = _measured_model(checkpoint)
    s = cfg.sample
    try:
        result = evaluate_regions(net, cfg, meta, rec.read, tok, n=n, counts=_int_list(counts, "--counts"),
                                  steps=steps or s.steps, guidance=s.guidance if guidance is None else guidance,
                                  sampler=sampler or s.sampler, seed=seed, methods=methods.split(","),
                                  background=background, place=not no_place, keep_images=2 if grid else 0,
                                  log=None if as_json else click.echo)
    except ValueError as e:
        raise UserError(str(e)) from None
    result.update(checkpoint=str(checkpoint), recogniser=rec.name, machine=machine())
    if grid:
        save_region_grid(result, grid)
        del result["images"]
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if out:
        _write_json(out, result)
    for path in (p for p in (out, grid) if p and not as_json):
        click.echo(f"wrote {path}")


@main.command("eval-edits")
@click.argument("checkpoint", type=CHECKPOINT)
@click.option("--n", default=32, show_default=True, type=click.IntRange(min=1), help="Real renders edited.")
@click.option("--objects", default=2, show_default=True, type=click.IntRange(1, 4), help="Objects per scene.")
@click.option("--strengths", default="0,0.2,0.4,0.6,0.8,1", show_default=True, help="Comma-separated, each in [0, 1].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps for strength 1 (default: sample.steps).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: sample.guidance).")
@click.option("--scheme", default="fixed_point", show_default=True, type=click.Choice(["fixed_point", "euler"]))
@click.option("--refine", type=click.IntRange(min=1), default=None, help="fixed_point refinements per step.")
@click.option("--round-trip", "round_trip_n", default=8, show_default=True, type=click.IntRange(min=0),
              help="Images of the round-trip table (0: none).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of tables.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here.")
@click.option("--plot", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: edit success against other objects kept, a curve per variant.")
@click.option("--plot-strength", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: success and others kept against strength.")
def eval_edits(checkpoint, n, objects, strengths, steps, guidance, scheme, refine, round_trip_n, seed, as_json, out,
               plot, plot_strength):
    """Inversion editing on the shapes world: one object of each of N real renders recoloured (its caption's
    colour word swapped) at each strength, with and without attention replacement and a mask of its box:
    edit success, other objects kept and PSNR outside the box, read by the recogniser; and the round trip
    (invert, regenerate under the same caption) per inversion scheme against NFE."""
    import json

    from dtrain.eval.edits import evaluate_edits, format_table, plot_edits
    from dtrain.precision import machine

    try:
        values = tuple(float(v) for v in strengths.split(","))
    except ValueError:
        raise UserError(f"--strengths: '{strengths}' is not a comma-separated list of numbers") from None
    if not all(0 <= v <= 1 for v in values):
        raise UserError(f"--strengths: every value must be in [0, 1], got {list(values)}")
    net, cfg, _, tok, rec = _measured_model(checkpoint)
    s = cfg.sample
    try:
        result = evaluate_edits(net, cfg, rec.read, tok, n=n, objects=objects, strengths=values,
                                steps=steps or s.steps, guidance=s.guidance if guidance is None else guidance,
                                scheme=scheme, refine=refine, seed=seed, round_trip_n=min(round_trip_n, n),
                                log=None if as_json else click.echo)
    except ValueError as e:
        raise UserError(str(e)) from None
    result.update(checkpoint=str(checkpoint), recogniser=rec.name, machine=machine())
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if out:
        _write_json(out, result)
    written = plot_edits(result, plot, plot_strength) if plot or plot_strength else []
    for path in ([out] if out else []) + written:
        if not as_json:
            click.echo(f"wrote {path}")


@main.command("recogniser")
@click.option("--image-size", default=32, show_default=True, help="Side in pixels, 16 to 64.")
@click.option("--retrain", is_flag=True, help="Train again even when a cached recogniser exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the accuracy table as JSON.")
def recogniser_cmd(image_size, retrain, as_json):
    """The shapes world's recogniser (the CNN that reads generated scenes back into objects): loaded
    from the cache ($DTRAIN_CACHE or ~/.cache/dtrain) or trained there (one thread, about a minute and
    a half at 32 pixels), and its accuracy table on held-out renders, clean and degraded, beside the
    analytic parser's and their agreement."""
    import json

    from dtrain.eval.recogniser import recogniser_table, shapes_recogniser

    try:
        rec = shapes_recogniser(image_size, retrain=retrain)
    except ValueError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps({"name": rec.name, "image_size": rec.image_size, "train_seconds": rec.train_seconds,
                               "path": str(rec.path), **rec.table}, indent=2))
    else:
        click.echo(recogniser_table(rec))


@main.command()
@click.argument("checkpoint", type=CHECKPOINT)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
def export(checkpoint, out):
    """Fold CHECKPOINT (EMA weights, config, meta) into one .safetensors file for inference."""
    from dtrain.checkpoint import export as export_checkpoint

    click.echo(f"wrote {export_checkpoint(checkpoint, out)}")


@main.group()
def bench():
    """Benchmarks: a table, or JSON with --json."""


@bench.command("flops")
@click.option("--json", "as_json", is_flag=True)
def bench_flops(as_json):
    """Forward GMACs of DiT S/B/L/XL at patch 2/4/8 on 256px latents, against the DiT paper."""
    from dtrain.bench import emit
    from dtrain.bench.flops import run

    click.echo(emit(run("dit"), as_json))


@bench.command("scaling")
@click.option("--json", "as_json", is_flag=True)
@click.option("--width", default=256, show_default=True)
@click.option("--depth", default=8, show_default=True)
@click.option("--attn-every", default=4, show_default=True, help="SSM-hybrid: every k-th block is attention.")
@click.option("--repeats", default=2, show_default=True, help="Timed passes per point (best is kept).")
def bench_scaling(as_json, width, depth, attn_every, repeats):
    """Forward+backward seconds vs tokens (256..4096), DiT vs SSM-hybrid, and fitted exponents."""
    from dtrain.bench import emit
    from dtrain.bench.scaling import run

    rows, summary = run(width=width, depth=depth, repeats=repeats, attn_every=attn_every)
    click.echo(emit(rows, as_json, summary))


@bench.command("objectives")
@click.option("--json", "as_json", is_flag=True)
@click.option("--config", default="configs/quickstart.yaml", show_default=True, type=click.Path(exists=True))
@click.option("--steps", default=20, show_default=True, help="Timed steps per objective (the median is kept).")
@click.argument("overrides", nargs=-1)
def bench_objectives(as_json, config, steps, overrides):
    """Milliseconds per training step of one model under each objective: flow matching, MeanFlow (JVP
    forward-mode and by double backward), consistency distillation."""
    from dtrain.bench import emit
    from dtrain.bench.objectives import run

    rows, summary = run(config, tuple(overrides), steps=steps)
    click.echo(emit(rows, as_json, summary))


@bench.command("train")
@click.option("--json", "as_json", is_flag=True)
@click.option("--steps", default=100, show_default=True)
@click.option("--warmup", default=20, show_default=True, help="Untimed steps at the start of every run.")
@click.option("--log-every", default=10, show_default=True)
@click.argument("overrides", nargs=-1)
def bench_train(as_json, steps, warmup, log_every, overrides):
    """Samples/s: plain PyTorch loop, torch DDP x2, dtrain with 1 and 2 workers (same model and data)."""
    from dtrain.bench import emit
    from dtrain.bench.train import run

    # Ray starts only after the torch baselines; with --json its workers' logs stay off stdout.
    rows, summary = run(steps=steps, warmup=warmup, log_every=log_every, overrides=list(overrides),
                        log_to_driver=not as_json)
    click.echo(emit(rows, as_json, summary))


@bench.command("zero")
@click.option("--json", "as_json", is_flag=True)
@click.option("--stages", default="0,1,2,3", show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--precision", default="bf16", show_default=True)
@click.option("--steps", default=2, show_default=True)
@click.argument("overrides", nargs=-1)
def bench_zero(as_json, stages, workers, precision, steps, overrides):
    """Per-rank model-state bytes per parameter for ZeRO stages, against the ZeRO paper's formula."""
    from dtrain.bench import emit
    from dtrain.bench.zero import run
    from dtrain.runtime import ensure_ray

    ensure_ray(log_to_driver=not as_json)  # JSON on stdout must not mix with workers' logs
    rows, summary = run(stages=tuple(int(s) for s in stages.split(",")), num_workers=workers,
                        precision=precision, steps=steps, overrides=list(overrides))
    click.echo(emit(rows, as_json, summary))


@bench.command("serve")
@click.argument("checkpoint", type=CHECKPOINT)
@click.option("--json", "as_json", is_flag=True)
@click.option("--steps", default=4, show_default=True, help="Sampler steps per request (one image each).")
@click.option("--seconds", default=6.0, show_default=True, help="Length of each load phase.")
@click.option("--concurrency", default="1,16,64", show_default=True, help="Clients against one fixed replica.")
@click.option("--baseline", default=4, show_default=True, help="Clients before and after the 8x spike.")
@click.option("--max-replicas", default=4, show_default=True)
@click.option("--batch-wait", default=0.005, show_default=True, help="Seconds a batch waits to fill.")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="PNG timeline of clients, replicas, p95.")
def bench_serve(checkpoint, as_json, steps, seconds, concurrency, baseline, max_replicas, batch_wait, plot):
    """Ray Serve against in-process sampling, then a spike and a flood on loopback (bounded in time)."""
    from dtrain.bench import emit
    from dtrain.bench.serve import run
    from dtrain.runtime import ensure_ray

    ensure_ray(num_cpus=1 + max_replicas, log_to_driver=not as_json)  # logical CPUs for the replicas
    from dtrain.storage import is_uri

    rows, summary = run(checkpoint if is_uri(checkpoint) else str(Path(checkpoint).resolve()), steps=steps, seconds=seconds,
                        concurrencies=_int_list(concurrency, "--concurrency"), baseline=baseline,
                        max_replicas=max_replicas, batch_wait_timeout_s=batch_wait, plot=plot)
    click.echo(emit(rows, as_json, summary))


@bench.command("watermark")
@click.argument("checkpoints", nargs=-1, required=True, type=CHECKPOINT)
@click.option("--json", "as_json", is_flag=True)
@click.option("--n", default=200, show_default=True, help="Watermarked and plain images per checkpoint.")
@click.option("--invert-steps", default=None, type=int,
              help="Steps of the ODE inversion (default: the checkpoint's sample.steps).")
@click.option("--no-quality", is_flag=True, help="Skip the FD with and without the watermark.")
@click.option("--sync", default="none", show_default=True, type=click.Choice(["none", "dihedral"]),
              help="dihedral: detection also tries the image flipped and quarter-turned back (8x the inversions).")
@click.option("--attacks", default=None, help="Comma-separated attacks to run (default: all; clean, flip, rotate_90deg, "
                                              "jpeg_q50, crop_resize_0.75, resize_0.5, rotate_3deg, rotate_10deg, "
                                              "blur_r0.5, noise_0.05).")
def bench_watermark(checkpoints, as_json, n, invert_steps, no_quality, sync, attacks):
    """Watermark TPR at 1% FPR per checkpoint (stage), clean and under JPEG, flips, quarter turns, crop,
    resize, rotation, blur and noise, with the detection time per image, and its image-quality cost (FD
    with and without)."""
    from dtrain.bench import emit
    from dtrain.bench.watermark import ATTACKS, run

    unknown = sorted(set(attacks.split(",") if attacks else ()) - set(ATTACKS))
    if unknown:
        raise UserError(f"--attacks: unknown attack {unknown[0]!r} (choose from {', '.join(ATTACKS)})")
    rows, summary = run(list(checkpoints), n=n, invert_steps=invert_steps, quality=not no_quality,
                        log=lambda line: click.echo(line, err=as_json), sync=sync,
                        attacks=tuple(attacks.split(",")) if attacks else None)
    click.echo(emit(rows, as_json, summary))


@bench.command("gpu")
@click.option("--json", "as_json", is_flag=True)
@click.option("--budget-s", default=480.0, show_default=True, help="Seconds for all checks; one that would not fit is skipped.")
@click.option("--tiny", is_flag=True, help="Tiny models on a GPU too (on a CPU they always are).")
@click.option("--with-serve", is_flag=True, help="Run the Serve check on a CPU too (on a GPU it runs when the budget allows).")
@click.option("--require-gpu", is_flag=True, help="Fail unless a CUDA device is present.")
def bench_gpu(as_json, budget_s, tiny, with_serve, require_gpu):
    """The GPU checks of a lent machine in one command: step time and MFU of DiT-XL/2 and the SSM-hybrid,
    SDPA backend, torch.compile, fused Adam, ZeRO-2/3, sampler latency per NFE, a Serve replica."""
    import json

    from dtrain.bench.gpu import render, run

    report = run(budget_s=budget_s, tiny=tiny, with_serve=with_serve, require_gpu=require_gpu,
                 log=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", required=True, type=CHECKPOINT, help="The model whose ODE is inverted.")
@click.option("--key-file", "key_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A watermark key (repeatable; default: the serving key, ~/.config/dtrain/watermark.key).")
@click.option("--steps", default=None, type=int, help="Steps of the ODE inversion (default: the checkpoint's sample.steps).")
@click.option("--sync", default="none", show_default=True, type=click.Choice(["none", "dihedral"]),
              help="dihedral: also find marks on flipped or quarter-turned copies (8x the inversions).")
def detect(images, checkpoint, key_files, steps, sync):
    """Is each IMAGE watermarked by one of the keys? Inverts CHECKPOINT's ODE to the image's noise and
    prints a JSON line per image: key_id, score, p_value, watermarked."""
    import json

    import torch

    from dtrain.checkpoint import load_model, read_meta
    from dtrain.generation import image_shape
    from dtrain.watermark import WatermarkKey, WatermarkKeyError, decode_for_model, default_key_file, recover_noise
    from dtrain.watermark import detect as detect_noise

    try:
        keys = [WatermarkKey.load(f) for f in key_files or [default_key_file()]]
    except (OSError, WatermarkKeyError) as e:
        raise UserError(f"no watermark key: {e}") from None
    net, cfg = load_model(checkpoint)
    shape = image_shape(cfg, read_meta(checkpoint))
    x = []
    for i in images:
        try:
            x.append(decode_for_model(Path(i).read_bytes(), shape))
        except ValueError as e:
            raise UserError(f"{i}: {e}") from None
    try:
        found = detect_noise(recover_noise(net, cfg, torch.stack(x), steps, sync=sync), keys)
    except ValueError as e:
        raise UserError(str(e)) from None
    for path, result in zip(images, found):
        click.echo(json.dumps({"image": path, **result}))


@main.group()
def detector():
    """A learned detector of generated images (spatial + FFT branches): generate shards, train, evaluate."""


def _named_checkpoints(pairs) -> dict[str, str]:
    """('NAME=CHECKPOINT', ...) -> {NAME: CHECKPOINT}; a UserError naming the bad one."""
    out = {}
    for p in pairs:
        name, sep, ckpt = p.partition("=")
        if not sep or not name or not ckpt:
            raise UserError(f"'{p}': give each generator as NAME=CHECKPOINT, e.g. pretrain-1200=runs/x/checkpoint_00001200")
        if name in out:
            raise UserError(f"generator name {name!r} given twice")
        if not _checkpoint_exists(ckpt):
            raise UserError(f"'{p}': checkpoint '{ckpt}': no such file or directory")
        out[name] = ckpt
    return out


def _checkpoint_exists(value: str) -> bool:
    from dtrain.storage import is_uri

    return is_uri(value) or Path(value).exists()


@detector.command("generate")
@click.argument("generators", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="One directory per generator is written here.")
@click.option("--n", default=256, show_default=True, type=click.IntRange(min=1), help="Images per generator.")
@click.option("--seed", default=0, show_default=True, help="Seeds seed..seed+n-1 (use other seeds for evaluation).")
@click.option("--no-ray", is_flag=True, help="Sample in this process, one checkpoint after another.")
@click.option("--watermarked", is_flag=True, help="With the keyed watermark (a fresh key): for a row apart, never training.")
@click.option("--address", default=None, help="Ray cluster address (default: start a local cluster).")
def detector_generate(generators, out, n, seed, no_ray, watermarked, address):
    """Sample each GENERATOR, given as NAME=CHECKPOINT, into OUT/NAME (WebDataset shards labelled NAME and
    a generator.json manifest), one Ray task per checkpoint."""
    from dtrain.detector.data import generate

    for m in generate(_named_checkpoints(generators), out, n=n, seed=seed, use_ray=not no_ray, address=address,
                      watermarked=watermarked):
        click.echo(f"{m['generator']}: {m['n']} images ({m['stage']}, {m['sampler']} {m['steps']} steps, guidance "
                   f"{m['guidance']}) in {m['sample_seconds']} s -> {Path(out) / m['generator']}")


@detector.command("train")
@click.option("--real", required=True, help="Real image shards (brace patterns, '::'-joined).")
@click.option("--generated", multiple=True, type=click.Path(file_okay=False),
              help="A directory of `dtrain detector generate` (repeatable).")
@click.option("--held-out", multiple=True, help="A generator name that must not be in training (repeatable): checked.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The detector file (.safetensors).")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=3e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1), help="Ray Train workers (DDP, gloo).")
@click.option("--width", default=16, show_default=True, type=click.IntRange(min=1), help="Conv channels per branch.")
@click.option("--branches", default="both", show_default=True, type=click.Choice(["both", "spatial", "fft"]))
@click.option("--encoding", default="png", show_default=True, help="What both classes go through: png or jpeg<q>.")
@click.option("--real-limit", default=None, type=click.IntRange(min=1), help="Use the first N real images.")
@click.option("--augment", default=0, show_default=True, type=click.IntRange(min=0),
              help="Attacked copies per image (random JPEG, rescale, crop, blur, noise), both classes alike.")
@click.option("--seed", default=0, show_default=True)
@click.option("--address", default=None, help="Ray cluster address (default: start a local cluster).")
@click.option("--json", "as_json", is_flag=True)
def detector_train(real, generated, held_out, out, epochs, batch_size, lr, workers, width, branches, encoding,
                   real_limit, augment, seed, address, as_json):
    """Train the detector with Ray Train on --real shards against --generated shards."""
    import json

    from dtrain.detector.encoding import check_encoding
    from dtrain.detector.model import DetectorConfig
    from dtrain.detector.train import fit

    missing = [d for d in generated if not Path(d).is_dir()]
    if missing:
        raise UserError(f"--generated {missing[0]}: no such directory")
    config = DetectorConfig(width=width, branches=branches, encoding=check_encoding(encoding))
    result = fit(real, list(generated), out, config, epochs=epochs, batch_size=batch_size, lr=lr, workers=workers,
                 real_limit=real_limit, held_out=list(held_out), seed=seed, address=address, augment_copies=augment,
                 log=lambda line: click.echo(line, err=as_json))
    if as_json:
        click.echo(json.dumps(result, indent=2))


@detector.command("eval")
@click.argument("detector_file", type=click.Path(dir_okay=False))
@click.option("--real", required=True, help="Real image shards the detector did not train on.")
@click.option("--generated", multiple=True, type=click.Path(file_okay=False),
              help="A directory of `dtrain detector generate` (repeatable); held out when not a training generator.")
@click.option("--attacks", default=None, help="Comma-separated attacks (default: all; clean, jpeg_q75, jpeg_q50, "
                                              "resize_0.5, crop_resize_0.75, blur_r0.5, noise_0.05).")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Images per class (default: all).")
@click.option("--reference", default=None, type=CHECKPOINT,
              help="A pixel-space checkpoint: adds the AEROBLADE-style baseline, reconstruction through its ODE.")
@click.option("--depth", default=0.25, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="How far back along the reference's ODE the reconstruction goes.")
@click.option("--json", "as_json", is_flag=True)
def detector_eval(detector_file, real, generated, attacks, limit, reference, depth, as_json):
    """AUC, AP and TPR at 1% FPR per generator, clean and under attacks, beside the training-free baselines."""
    from dtrain.bench import emit
    from dtrain.detector.evaluate import DETECTOR_ATTACKS, evaluate

    names = tuple(a for a in attacks.split(",") if a) if attacks else None
    unknown = sorted(set(names or ()) - set(DETECTOR_ATTACKS))
    if unknown:
        raise UserError(f"--attacks: unknown attack {unknown[0]!r} (choose from {', '.join(DETECTOR_ATTACKS)})")
    missing = [d for d in generated if not Path(d).is_dir()]
    if not generated or missing:
        raise UserError(f"--generated {missing[0]}: no such directory" if missing else
                        "give --generated DIR (repeatable): the generated images to score")
    rows, summary = evaluate(detector_file, real, list(generated), names, limit, reference=reference, depth=depth,
                             log=lambda line: click.echo(line, err=as_json))
    click.echo(emit(rows, as_json, summary))


@main.command()
@click.argument("checkpoint", type=CHECKPOINT)
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt", default=None, help="Text model: the target prompt.")
@click.option("--source-prompt", default="", help="Text model: what IMAGE shows (default: the empty prompt).")
@click.option("--class-label", type=int, default=None, help="Class model: the target class.")
@click.option("--source-class", type=int, default=None, help="Class model: IMAGE's class (default: the null class).")
@click.option("--strength", required=True, type=click.FloatRange(0, 1),
              help="How far back IMAGE is inverted: 0 returns it, 1 regenerates from its noise.")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An image of IMAGE's size: white may change, black stays exactly as it is.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps for strength 1 (default: sample.steps).")
@click.option("--guidance", type=float, default=None, help="CFG scale of inversion and regeneration (default: sample.guidance).")
@click.option("--scheme", default="fixed_point", show_default=True, type=click.Choice(["fixed_point", "euler"]),
              help="Inversion: fixed-point corrected, or plain Euler reversal.")
@click.option("--refine", type=click.IntRange(min=1), default=None, help="fixed_point refinements per step.")
@click.option("--attention-replace", is_flag=True,
              help="Text model: the source prompt's cross-attention maps drive the layout (prompt-to-prompt).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The edited image (PNG).")
def edit(checkpoint, image, prompt, source_prompt, class_label, source_class, strength, mask, steps, guidance, scheme,
         refine, attention_replace, out):
    """Edit IMAGE with CHECKPOINT: invert it along the model's ODE to the time set by --strength, then
    regenerate under --prompt (or --class-label); prints the network evaluations and the time taken."""
    import time

    import torch
    from PIL import Image

    from dtrain.checkpoint import load_model, read_meta, read_tokenizer
    from dtrain.editing import EditError, edit as edit_image, read_image, read_mask
    from dtrain.generation import conditions
    from dtrain.images import to_uint8

    net, cfg = load_model(checkpoint)
    m, s = cfg.model, cfg.sample
    if read_meta(checkpoint).get("latents"):
        raise EditError("editing a latent model's images needs its VAE encoder, which is not wired yet")
    if m.conditioning == "text":
        if prompt is None or class_label is not None or source_class is not None:
            raise UserError("this is a text model: give --prompt (and --source-prompt), not --class-label")
        source, target = conditions(cfg, read_tokenizer(checkpoint), [source_prompt, prompt]).chunk(2)
    else:
        if class_label is None or prompt is not None:
            raise UserError("this is a class model: give --class-label (and --source-class), not --prompt")
        bad = [c for c in (class_label, source_class) if c is not None and not 0 <= c < m.num_classes]
        if bad:
            raise UserError(f"class {bad[0]} outside 0..{m.num_classes - 1}")
        source = torch.tensor([m.num_classes if source_class is None else source_class])
        target = torch.tensor([class_label])
    x = read_image(image, (m.in_channels, m.image_size, m.image_size))[None]
    keep = None if mask is None else read_mask(mask, m.image_size)
    start = time.perf_counter()
    y, nfe = edit_image(net, cfg, x, source, target, strength, steps or s.steps, s.guidance if guidance is None else guidance,
                        scheme, refine, keep, attention_replace)
    seconds = time.perf_counter() - start
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(y)[0]).save(out, format="PNG")
    click.echo(f"wrote {out} (strength {strength}, {scheme} inversion, {nfe} network evaluations, {seconds:.2f} s)")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--trust-anchors", default=None, type=click.Path(exists=True, dir_okay=False),
              help="PEM CA certificates whose signers count as trusted.")
def verify(images, trust_anchors):
    """Check each PNG's signed C2PA manifest: a JSON line per image with valid (unchanged since signing),
    trusted (signer chains to --trust-anchors), errors and the generation record (model, version, seed...)."""
    import json

    from dtrain.provenance import ProvenanceError, verify_png

    anchors = Path(trust_anchors).read_text() if trust_anchors else None
    all_valid = True
    for path in images:
        try:
            found = verify_png(Path(path).read_bytes(), anchors)
        except ProvenanceError as e:
            found = {"valid": False, "errors": [{"code": "manifest.unreadable", "explanation": str(e)}]}
        all_valid &= found["valid"]
        click.echo(json.dumps({"image": path, **found}))
    if not all_valid:
        sys.exit(1)


@main.command()
@click.argument("checkpoint", required=False, type=CHECKPOINT)
@click.option("--models", "models_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A registry instead of CHECKPOINT: YAML of model name -> {versions: {version: checkpoint}, "
                   "default, canary, fallback}, as under `models:` in serve/digits.yaml.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback: this machine only).")
@click.option("--port", default=8000, show_default=True, help="HTTP port.")
@click.option("--replicas", default=None, type=int, help="A fixed sampler replica count (default: autoscaling).")
@click.option("--max-replicas", default=None, type=int, help="Autoscaling's upper bound (default 4).")
@click.option("--tokens-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Bearer tokens, one per line (also: $DTRAIN_SERVE_TOKENS, comma-separated); auth is off without.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Replicas' precision (auto: the fastest this device runs).")
@click.option("--watermark-key-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Watermark key, 64 hex digits (default: ~/.config/dtrain/watermark.key, created on first use).")
@click.option("--no-watermark", is_flag=True, help="Serve images without the invisible watermark.")
@click.option("--provenance-cert-chain", default=None, type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate chain (signer first) for the C2PA manifests (default: test credentials).")
@click.option("--provenance-key", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The signer's unencrypted PEM private key.")
@click.option("--no-provenance", is_flag=True, help="Serve PNGs without a signed C2PA manifest.")
def serve(checkpoint, models_file, host, port, replicas, max_replicas, tokens_file, precision, watermark_key_file,
          no_watermark, provenance_cert_chain, provenance_key, no_provenance):
    """Serve CHECKPOINT (or a registry of --models) over HTTP with Ray Serve until interrupted:
    POST /v1/generate (watermarked images), POST /v1/detect, GET /v1/models, GET /healthz, docs at /docs."""
    from pydantic import ValidationError

    from dtrain.config import _load_yaml
    from dtrain.serving.app import run_blocking
    from dtrain.serving.config import Autoscaling, ServeArgs

    try:
        models = None
        if models_file:
            from omegaconf import OmegaConf

            models = OmegaConf.to_container(_load_yaml(Path(models_file)))
        scaling = Autoscaling(**({"max_replicas": max_replicas} if max_replicas else {}))
        args = ServeArgs(checkpoint=checkpoint, models=models, num_replicas=replicas, autoscaling=scaling,
                         auth_tokens_file=tokens_file, precision=precision, watermark=not no_watermark,
                         watermark_key_file=watermark_key_file, provenance=not no_provenance,
                         provenance_cert_chain=provenance_cert_chain, provenance_key=provenance_key)
        run_blocking(args, host=host, port=port)
    except (ValidationError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
