"""Training throughput of a config under each precision and memory layout: what fits in a time budget.

Runs the real trainer (`cmp_train`, data loading included) for a few iterations per setting and prints the
steady pairs/s (median of the logged rates after the first logging interval, which pays for start-up), the ratio
to float32, and the minutes the config's own iteration count would take at that rate. A short run still pays for
its start (the first batches, the allocator, oneDNN's kernel choices), so it understates the rates of a long run. On
a shared machine the bfloat16 rate also varies from run to run: with 300 iterations per setting, float32 matched
its whole-run rate (11.3 against 11.4 pairs/s) and bf16 + channels_last did not (16.0 against 20.0). Compare the
settings with each other, and take a whole run's rate from its metrics.jsonl.

Settings: float32 (train.amp=none); bfloat16 autocast (train.amp=bf16); bfloat16 + channels_last. On a CPU,
bfloat16 is fast only where the CPU computes in it (AVX512-BF16 or AMX: `lscpu | grep -o 'amx_bf16\\|avx512_bf16'`);
elsewhere it is emulated and can be slower than float32, which this script shows.

    .venv/bin/python benchmarks/bench_train_speed.py [--config configs/base.yaml] [--iters 80] [--json out.json]
"""
import argparse, json, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {'float32': ['train.amp=none', 'train.channels_last=false'],
            'bf16': ['train.amp=bf16', 'train.channels_last=false'],
            'bf16 + channels_last': ['train.amp=bf16', 'train.channels_last=true']}


def cpu_bf16_flags() -> str:
    "The CPU's bf16 features from /proc/cpuinfo ('' where none or not Linux)."
    try: flags = Path('/proc/cpuinfo').read_text().split()
    except OSError: return ''
    return ' '.join(sorted({f for f in flags if f in ('amx_bf16', 'avx512_bf16')}))


def run_rate(config: str, iters: int, overrides: list, log_every: int) -> tuple[float, float]:
    "(steady pairs/s, wall s) of `cmp_train` for `iters` iterations with these overrides, in a scratch run dir."
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, '-m', 'cmp_nb.train', '--config', config, f'train.iters={iters}', f'ckpt.run_dir={d}',
               f'log.every={log_every}', 'log.val_every=100000000', 'log.image_every=100000000', *overrides]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode: raise RuntimeError(f'{" ".join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}')
        rates = [json.loads(l).get('train/pairs_per_s') for l in (Path(d) / 'metrics.jsonl').read_text().splitlines()]
        rates = [v for v in rates if v is not None][1:]      # the first interval pays for start-up
        if not rates: raise RuntimeError(f'no pairs/s logged in {iters} iterations: raise --iters')
        return statistics.median(rates), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=str(ROOT / 'configs' / 'base.yaml'))
    p.add_argument('--iters', type=int, default=80, help='iterations per setting (default 80)')
    p.add_argument('--log-every', type=int, default=10)
    p.add_argument('--settings', nargs='*', default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument('--json', help='also write the rows here')
    a = p.parse_args(argv)
    from cmp_nb.config import as_config, load_config
    try: cfg = as_config(load_config(a.config), a.config)
    except (ValueError, FileNotFoundError) as e: p.error(f'--config {a.config}: {e}')
    T = cfg.train
    print(f'== {a.config}: batch {T.batch_size}, {T.iters} iterations, device {T.device}, {T.threads} threads; '
          f'CPU bf16 features: {cpu_bf16_flags() or "none"}')
    rows = {}
    for name in a.settings:
        rate, wall = run_rate(a.config, a.iters, SETTINGS[name], a.log_every)
        rows[name] = dict(pairs_per_s=rate, run_s=wall, config_minutes=T.iters * T.batch_size / rate / 60)
    base = rows.get('float32', {}).get('pairs_per_s')
    print(f'{"setting":<22}{"pairs/s":>9}{"x float32":>11}{"min for " + str(T.iters) + " its":>18}')
    for name, r in rows.items():
        ratio = f'{r["pairs_per_s"] / base:.2f}' if base else '-'
        print(f'{name:<22}{r["pairs_per_s"]:>9.1f}{ratio:>11}{r["config_minutes"]:>18.1f}')
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
