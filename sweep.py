"""
The paper's experiments in miniature (Apollo §3-4): each study trains its variants over several seeds and
writes results/STUDY.md, our mean +- std per category beside the paper's numbers, and where matplotlib is
installed a plot like the paper's figure.

    python sweep.py resampler               # one study at the study preset (each within an hour on 2 CPU cores)
    python sweep.py tokens --seeds=5 --preset=cpu
    python sweep.py resampler --test_videos=1000   # its runs scored again on 1,000 test videos a seed
    python sweep.py --list                  # the studies and their variants

Every run is a plain `train.py` run in its own folder, results/runs/STUDY/VARIANT-sSEED, so a study that is
stopped and started again skips the runs that finished (their eval.json is there) and resumes the one that
was cut off (train.py reuses finished stages and continues the interrupted one). A run made by other code
(any of SOURCES changed since, in more than comments and docstrings) is trained again, so a component you
swapped is what the study measures. The text-only stage lm does not depend on the vision side, so each seed
trains it once per LM size and every variant starts from it (--lm_from), the way the paper's variants all
start from one pretrained Qwen. Likewise the stage encoders depends only on the encoders' own flags: each seed
pretrains them once per such setting, at the preset's sampling, and every variant that shares the setting starts
from that encoders.pt, the way the paper's variants all start from one SigLIP and one InternVideo2. A variant whose
configuration another study has already run at this code (the defaults are resampler's perceiver, integration's
timestamp, schedule's 3 stages, the tokens study's fps 1 x 8 tpf and scaling's perceiver @ large) takes that run's
results and is not trained again; the report names the runs it took.

A run's own test split (80 videos at the study preset, about 310 questions) measures its score to about +- 2.6 points,
as much as variants differ here. --test_videos=N scores every finished run again, without training, on N test videos
of its seed's world: the same generator, so its own test videos and N less them new ones (rescore); the report is
results/STUDY-testN.md.
"""
import ast
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

from config import config_from_args
from report import HERE, plot, report, scored_on, summarise, test_world

# study -> variant -> train.py overrides; "paper" holds the paper's ApolloBench overall for the same variant
STUDIES = {
    "sampling": {
        "what": "uniform sampling of N frames vs fps sampling, in training and at test time (§4.1)",
        "variants": {
            "uniform 8": ["--sampling=uniform", "--num_frames=8"],
            "uniform 16": ["--sampling=uniform", "--num_frames=16"],
            "uniform 16, fps at test": ["--sampling=uniform", "--num_frames=16", "--eval_sampling=fps"],
            "fps 1": ["--sampling=fps", "--fps=1"],
            "fps 2": ["--sampling=fps", "--fps=2", "--max_clips=8"],
        },
        "paper": {"uniform 8": 44.2, "uniform 16": 48.1, "uniform 16, fps at test": 52.6, "fps 2": 58.5},
    },
    "tokens": {
        "what": "frames per second x tokens per frame (§4.1, the fps x tokens heatmap)",
        "variants": {f"fps {f} x {t} tpf": [f"--fps={f}", f"--tokens_per_frame={t}", f"--max_clips={int(4 * f)}"]
                     for f in (0.5, 1, 2) for t in (2, 8, 16)},
        "paper": {},  # a figure in the paper: best 58.6 at 4 fps x 8 tpf, 58.3 at 2 fps x 32; 4 tpf 21.5-50.5
    },
    "encoders": {
        "what": "image / video / both encoders; SigLIP vs CLIP vs masked-video pretraining vs none (§4.2)",
        "variants": {
            "image, none": ["--vision=image", "--encoders_steps=0"],
            "image, siglip": ["--vision=image", "--encoders_steps=300"],
            "video, siglip": ["--vision=video", "--encoders_steps=300"],
            "video, masked": ["--vision=video", "--encoders_steps=300", "--video_objective=masked"],
            "image+video, siglip": ["--vision=image+video", "--encoders_steps=300"],
            "image+video, clip": ["--vision=image+video", "--encoders_steps=300", "--contrastive_loss=clip"],
        },
        "paper": {"image, siglip": 52.7, "video, siglip": 52.0, "video, masked": 41.2, "image+video, siglip": 57.9},
    },
    "resampler": {
        "what": "the connector that turns each frame into tokens (Table 1)",
        "variants": {"perceiver": ["--resampler=perceiver"], "mlp_pool": ["--resampler=mlp_pool"],
                     "conv_pool": ["--resampler=conv_pool"]},
        "paper": {"perceiver": 55.5, "mlp_pool": 53.2, "conv_pool": 44.7},
    },
    "integration": {
        "what": "how the video tokens are placed among the text (Table 2)",
        "variants": {k: [f"--integration={k}"] for k in ("plain", "start_end", "timestamp", "timestamp_start_end")},
        "paper": {"plain": 55.5, "start_end": 56.7, "timestamp": 56.8, "timestamp_start_end": 56.2},
    },
    "schedule": {
        "what": "1, 2 or 3 training stages (same total steps), and the share of text-only data in sft (§5)",
        "variants": {"3 stages": ["--schedule=3"], "2 stages": ["--schedule=2"], "1 stage": ["--schedule=1"],
                     "3 stages, no text": ["--text_share=0"]},
        "paper": {"3 stages": 59.2, "2 stages": 57.8, "1 stage": 48.7, "3 stages, no text": 47.5},
    },
}
# the scaling study: variants of the other studies, each at two LM sizes; the paper's R^2 was 0.83 (1.5B vs 7B).
# Six distinct configurations: the Perceiver is also integration's timestamp and schedule's 3 stages (the defaults),
# and a variant counted three times would count its one point three times in the R^2.
SCALING_VARIANTS = ["resampler/perceiver", "resampler/mlp_pool", "resampler/conv_pool", "integration/plain",
                    "integration/start_end", "schedule/1 stage"]
LM_SIZES = {"small": ["--lm_dim=64", "--lm_heads=2"], "large": []}  # large: the preset's own LM
STUDIES["scaling"] = {
    "what": "the same variants at two LM sizes; do the smaller model's rankings hold at the larger? (§3)",
    "variants": {f"{v} @ {size}": STUDIES[v.split("/")[0]]["variants"][v.split("/")[1]] + args
                 for v in SCALING_VARIANTS for size, args in LM_SIZES.items()},
    "paper": {},
    "pairs": SCALING_VARIANTS,  # the report's R^2 and scatter: each variant's small LM against its large
}
LM_ARGS = ("--lm_dim", "--lm_layers", "--lm_heads", "--lm_smear", "--vocab_size")
ENCODER_ARGS = ("--vision", "--motion", "--image_size", "--patch_size", "--vit_", "--encoders_", "--contrastive_loss",
                "--video_objective", "--frames_per_clip")  # what the stage encoders' result depends on


def flags_key(flags):
    """Flags as a folder name, "--lm_dim=64" -> "lm_dim64" ("default" when there are none): a shared stage's folder
    is named by the flags that shape it."""
    return "-".join(a[2:].replace("=", "") for a in flags) or "default"


SOURCES = ["scene.py", "questions.py", "data.py", "sampling.py", "encoders.py", "resampler.py", "integrate.py",
           "layers.py", "apollo.py", "samples.py", "config.py", "evaluate.py", "train.py"]


def code_version(root=HERE):
    """A hash of the code a run depends on: a run made by other code is not reused (you changed a component
    to see what it does: the study must train again, not hand back the old numbers). It hashes each file's syntax
    tree without docstrings, so editing a comment, a docstring or the layout keeps the runs; any change to what
    the code does (a statement, a constant, a default) trains them again."""
    digest = hashlib.sha1()
    for name in SOURCES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=name)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(name.encode() + ast.dump(tree).encode())
    return digest.hexdigest()[:12]


def made_by(run):
    """The code_version a run's folder was made by (None: no stamp)."""
    stamp = os.path.join(run, "code_version.txt")
    return open(stamp).read() if os.path.exists(stamp) else None


def train(args, out, log, done="eval.json", start_from=None):
    """One train.py run into out (skipped when its file done is there and the code is the same); returns its
    eval.json. A folder made by other code is moved to OUT.old (replacing an older one) and the run starts over.
    start_from: a shared run's folder whose encoders.pt (and retrieval.json) a new run starts with."""
    stamp, version = os.path.join(out, "code_version.txt"), code_version()
    if os.path.exists(out) and made_by(out) != version:
        log(f"{out} was made by other code: moved to {out}.old, training again")
        shutil.rmtree(out + ".old", ignore_errors=True)
        os.replace(out, out + ".old")
    if not os.path.exists(os.path.join(out, done)):
        os.makedirs(out, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(version)
        for name in ("encoders.pt", "retrieval.json") if start_from else ():
            if os.path.exists(os.path.join(start_from, name)) and not os.path.exists(os.path.join(out, name)):
                shutil.copy(os.path.join(start_from, name), os.path.join(out, name))
        with open(os.path.join(out, "log.txt"), "a") as f:
            run = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args, f"--out_dir={out}",
                                  "--resume"], stdout=f, stderr=subprocess.STDOUT, cwd=HERE)
        if run.returncode != 0:
            raise SystemExit(f"error: the run in {out} failed; see {out}/log.txt")
        log(f"finished {out}")
    path = os.path.join(out, "eval.json")
    return json.load(open(path)) if os.path.exists(path) else None


def run_study(name, seeds=3, preset="study", root="results", log=print):
    """Train every variant of a study over seeds (the stage lm once per seed and LM size); returns
    {variant: [eval.json of each seed]}."""
    study = STUDIES[name]
    results = {}
    for variant, args in study["variants"].items():
        for seed in range(seeds):
            common = [f"--preset={preset}", f"--seed={seed}", f"--data_dir={os.path.join(root, 'data')}"]
            lm_args = [a for a in args if a.startswith(LM_ARGS)]
            lm_dir = os.path.join(root, "runs", "lm", f"{preset}-{flags_key(lm_args)}-s{seed}")
            train([*common, *lm_args, "--stage=lm"], lm_dir, log)  # or reuse
            enc_args = [a for a in args if a.startswith(ENCODER_ARGS)]
            enc_dir = None
            if "--encoders_steps=0" not in enc_args:  # pretrained once per seed and setting (or reused)
                enc_dir = os.path.join(root, "runs", "pretrained",
                                       f"{preset}-{flags_key(enc_args)}-{flags_key(lm_args)}-s{seed}")
                train([*common, *lm_args, *enc_args, "--stage=encoders", f"--lm_from={lm_dir}"], enc_dir, log,
                      done="encoders.pt")
            out = os.path.join(root, "runs", name, f"{slug(variant)}-s{seed}")
            run_args = [*common, *args, f"--lm_from={lm_dir}"]
            twin = same_run(run_args, out, root)
            if twin:
                log(f"{name}/{variant}, seed {seed}: the configuration of {twin}, whose results it takes")
            result = train(run_args, twin or out, log, start_from=enc_dir)
            results.setdefault(variant, []).append({**result, "run": os.path.relpath(twin or out, root)})
    return results


def same_run(args, out, root):
    """A finished run of another study, made by this code, with the configuration args give (its config.json but for
    where it wrote), or None. The studies share their baseline (resampler's perceiver is integration's timestamp,
    schedule's 3 stages and the tokens study's fps 1 x 8 tpf): it is trained once and reported in each, as a study run
    twice reproduces to the digit on a CPU. A variant's own finished run comes first."""
    if os.path.exists(os.path.join(out, "eval.json")):
        return None

    def where_aside(cfg):
        return {k: v for k, v in cfg.items() if k not in ("out_dir", "resume")}
    want, version = where_aside(asdict(config_from_args(args))), code_version()
    for path in sorted(glob.glob(os.path.join(root, "runs", "*", f"*-s{want['seed']}", "config.json"))):
        run = os.path.dirname(path)
        if (run != out and os.path.exists(os.path.join(run, "eval.json")) and made_by(run) == version
                and where_aside(json.load(open(path))) == want):
            return run
    return None


def slug(text):
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def rescore(run, test_videos, log=print):
    """A finished run's final checkpoint scored on test_videos test videos (test_world), as train.py scores its own
    split: eval-testN.json and answers-testN.jsonl in the run's folder, kept while the checkpoint is the same."""
    from bench import load_run  # (torch and the model: only when a study is scored again)
    from data import make_world
    from evaluate import score_test_split
    ckpt, path = os.path.join(run, "sft.pt"), os.path.join(run, f"eval{scored_on(test_videos)}.json")
    made = [made_by(run), os.path.getsize(ckpt), os.path.getmtime(ckpt)]
    kept = json.load(open(path)) if os.path.exists(path) else {}
    if kept.get("made_from") == made:
        return kept
    model, tok, cfg, env = load_run(ckpt)
    world = make_world(test_world(cfg, test_videos), os.path.join(HERE, cfg.data_dir), log=lambda *a: None)
    result = score_test_split(model, world, tok, cfg, env)
    with open(os.path.join(run, f"answers{scored_on(test_videos)}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in result.pop("answers"))
    with open(path, "w") as f:
        json.dump({**result, "made_from": made}, f, indent=1)
    log(f"scored {run} on {test_videos} test videos: {result['overall']:.3f} (n={result['n']})")
    return result


def main(argv):
    opts = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    names = [a for a in argv if not a.startswith("--")]
    if "list" in opts or not names:
        for name, study in STUDIES.items():
            print(f"{name}: {study['what']}\n    " + "\n    ".join(study["variants"]))
        return None
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        raise SystemExit(f"error: unknown study {unknown[0]!r}; choose from {list(STUDIES)}")
    for key in opts:  # a mistyped option is an error, not a default silently used
        if key not in ("list", "seeds", "preset", "root", "test_videos"):
            raise SystemExit(f"error: sweep.py: unknown option --{key}; it takes --seeds, --preset, --root, "
                             "--test_videos, --list")
    seeds, preset, root = int(opts.get("seeds", 3)), opts.get("preset", "study"), opts.get("root", "results")
    test_videos = opts.get("test_videos")
    if test_videos is not None and not (test_videos.isdigit() and int(test_videos) > 0):
        raise SystemExit(f"error: sweep.py: --test_videos takes a number of videos, got {test_videos!r}")
    test_videos = test_videos and int(test_videos)
    for name in names:
        results = run_study(name, seeds, preset, root)
        if test_videos is not None:  # every run scored again on a larger test split of its seed's world
            results = {v: [{**rescore(os.path.join(root, r["run"]), test_videos), "run": r["run"]} for r in runs]
                       for v, runs in results.items()}
        summary = summarise(results, root, test_videos)
        os.makedirs(root, exist_ok=True)
        text = report(name, STUDIES[name], summary, seeds, preset, test_videos)
        out = name + scored_on(test_videos)
        if plot(name, STUDIES[name], summary, os.path.join(root, f"{out}.png")):
            text += f"\n![{name}]({out}.png)\n"
        with open(os.path.join(root, f"{out}.md"), "w") as f:
            f.write(text)
        print(text)
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
