"""
GPT-2 large (774M) trained under FSDP on 2 CPU processes, a model this machine cannot train under DDP, with
sharded checkpoints; and the save/load times of sharded checkpoints, synchronous and asynchronous.

    python experiments/fsdp_large.py                  # every row below; needs ~15 GiB free memory and ~25 GiB disk
    python experiments/fsdp_large.py --only=times --time_sizes=124M,355M

Rows (each a torchrun launch of this script; CPU, gloo, fp32, batch 1 per process, --seq_len tokens):
  large:   FSDP on 2 processes: the model built on the meta device, sharded, initialised shard by shard; --steps
           AdamW steps; a synchronous sharded save. A resume of that checkpoint on 2 processes (FSDP) and on 1
           (the whole model: with AdamW and a step as far as this machine's free memory allows). The training
           again with fsdp_cpu_offload.
  ddp:     DDP's requirement for GPT-2 large, computed: every rank holds all parameters, gradients and AdamW's two
           moments (16 bytes a parameter) plus what DDP on 2 processes measures beyond that at GPT-2 small (124M),
           which trains here.
  times:   for --time_sizes under FSDP on 2 processes: the time a synchronous save takes (the training loop waits
           for all of it), the time an asynchronous save blocks the loop (its copy of the shards to memory), the
           time until it is written while the loop trains on, and the time to load the checkpoint; the large
           model's synchronous save and load come from its rows. An asynchronous save holds a second copy of each
           process's state: where memory is short it is not run, and the table says so.
Each process's peak resident memory is resource.getrusage's ru_maxrss, with glibc's mmap threshold fixed (see
--malloc_mmap_threshold) in every row alike. Results: out_dir/results.json, and a
Markdown table on stdout.
"""

import os
import sys
import json
import time
import shutil
import resource
import argparse
import subprocess

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {"124M": dict(n_layer=12, n_head=12, n_embd=768), "355M": dict(n_layer=24, n_head=16, n_embd=1024),
         "774M": dict(n_layer=36, n_head=20, n_embd=1280)}
GiB = 2**30


def mem_available():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# -----------------------------------------------------------------------------
# the worker: one process of a torchrun launch (or alone)

def worker(args):
    import torch
    import torch.distributed as dist
    from model import GPT, GPTConfig
    from distributed import new_sharded_model
    from sharded_checkpoint import ShardedCheckpointer, load_training_state

    baseline = peak_rss()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    config = GPTConfig(block_size=1024, vocab_size=50304, dropout=0.0, **SIZES[args.size])
    record = dict(phase=args.phase, size=args.size, rank=rank, world_size=world, offload=args.offload,
                  baseline_rss=baseline)
    checkpoint = os.path.join(args.out_dir, f"ckpt-{args.size}.dcp")

    def shard(model):
        from torch.distributed.fsdp import fully_shard, CPUOffloadPolicy
        kwargs = dict(offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())) if args.offload else {}
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)

    torch.manual_seed(1337)
    t0 = time.perf_counter()
    fsdp = distributed and args.phase != "ddp"
    initialise = args.phase not in ("resume", "times_load")
    if fsdp or not initialise:
        model = new_sharded_model(config, shard if fsdp else (lambda m: None), "cpu", initialise=initialise)
    else:
        model = GPT(config)
    record.update(build_s=time.perf_counter() - t0, rss_after_build=peak_rss())
    runner = model
    if args.phase == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)

    def train_step(step):
        t = time.perf_counter()
        x = torch.randint(0, config.vocab_size, (world, args.seq_len + 1), generator=torch.Generator().manual_seed(step))
        row = x[rank:rank + 1]
        _, loss = runner(row[:, :-1].contiguous(), row[:, 1:].contiguous())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def barrier():
        if distributed:
            dist.barrier()

    values = dict(model_args=config.to_dict(), iter_num=args.steps, world_size=world)
    if args.phase in ("train", "ddp"):
        record["step_s"] = [train_step(step) for step in range(args.steps)]
        if args.phase == "train":
            barrier()
            t = time.perf_counter()
            ShardedCheckpointer().save(checkpoint, model, optimizer, values)
            barrier()
            record["save_s"] = time.perf_counter() - t
    elif args.phase == "resume":
        t = time.perf_counter()
        load_training_state(checkpoint, model, optimizer if args.with_optimizer else None)
        barrier()
        record["load_s"] = time.perf_counter() - t
        record["with_optimizer"] = args.with_optimizer
        if args.train_after:
            record["step_s"] = [train_step(args.steps)]
    elif args.phase == "times_save":
        record["step_s"] = [train_step(0)]
        barrier()
        t = time.perf_counter()
        ShardedCheckpointer().save(checkpoint, model, optimizer, values)
        barrier()
        record["sync_save_s"] = time.perf_counter() - t
        record["checkpoint_bytes"] = folder_bytes(checkpoint) if rank == 0 else None
        if args.asynchronous:
            checkpointer = ShardedCheckpointer(asynchronous=True)
            barrier()
            t = time.perf_counter()
            checkpointer.save(checkpoint, model, optimizer, values)
            record["async_blocked_s"] = time.perf_counter() - t
            steps_during = 0
            while checkpointer.pending is not None and not checkpointer.pending.done():
                train_step(1 + steps_during)  # the loop goes on while the shards are written
                steps_during += 1
            t_wait = time.perf_counter()
            checkpointer.close()
            record["async_wait_after_s"] = time.perf_counter() - t_wait  # what the next save would wait for
            barrier()
            record["async_total_s"] = time.perf_counter() - t
            record["async_steps_during"] = steps_during
    elif args.phase == "times_load":
        barrier()
        t = time.perf_counter()
        load_training_state(checkpoint, model, optimizer)
        barrier()
        record["load_s"] = time.perf_counter() - t
    record["peak_rss"] = peak_rss()
    if rank == 0 and os.path.isdir(checkpoint) and args.phase == "train":
        record["checkpoint_bytes"] = folder_bytes(checkpoint)
    with open(os.path.join(args.out_dir, f"{args.tag}-rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the driver

def launch(args, tag, phase, size, nproc, *extra):
    """One torchrun launch (or one process) of the worker; returns its records, one per rank."""
    here = os.path.abspath(__file__)
    worker_args = [here, "--worker", f"--phase={phase}", f"--size={size}", f"--tag={tag}", f"--out_dir={args.out_dir}",
                   f"--steps={args.steps}", f"--seq_len={args.seq_len}", *extra]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker_args]
               if nproc > 1 else [sys.executable, *worker_args])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    print(f"-- {tag}: {phase} {size} on {nproc} process(es) {' '.join(extra)} "
          f"(MemAvailable {mem_available() / GiB:.1f} GiB)", flush=True)
    t = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{tag} failed ({result.returncode})")
    records = []
    for rank in range(nproc):
        with open(os.path.join(args.out_dir, f"{tag}-rank{rank}.json")) as f:
            records.append(json.load(f))
    print(f"   {time.perf_counter() - t:.0f} s: " + "; ".join(
        f"rank {r['rank']} peak {r['peak_rss'] / GiB:.2f} GiB" for r in records), flush=True)
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="out-fsdp-large")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--only", choices=["large", "ddp", "times"], default=None)
    parser.add_argument("--large", choices=SIZES, default="774M", help="the model of the large rows")
    parser.add_argument("--time_sizes", default="124M",
                        help="the models of the save/load times (besides the large rows' own: their save and load)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--min_free_gib", type=float, default=15.0, help="refuse to start the large rows below this")
    # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the heap: peak
    # RSS then counts memory no tensor holds (124M under FSDP: 3.0 GiB a rank instead of 1.8). A fixed threshold
    # returns freed blocks to the system, so the peak is what the process held; 0 leaves glibc's default
    parser.add_argument("--malloc_mmap_threshold", type=int, default=131072)
    # the worker's own settings
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="774M", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--asynchronous", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--with_optimizer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train_after", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    os.makedirs(args.out_dir, exist_ok=True)
    results = {}
    path = os.path.join(args.out_dir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)

    def keep(name, records):
        results[name] = records
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    import torch
    import model
    with torch.device("meta"):
        params = {size: model.GPT(model.GPTConfig(block_size=1024, vocab_size=50304, **shape)).get_num_params()
                  for size, shape in SIZES.items()}
    results["params"] = params

    if args.only in (None, "large"):
        if mem_available() < args.min_free_gib * GiB:
            raise SystemExit(f"error: {mem_available() / GiB:.1f} GiB available, the large rows need about "
                             f"{args.min_free_gib:.0f}; free memory or pass --min_free_gib")
        large = args.large
        keep("fsdp_train", launch(args, "fsdp_train", "train", large, 2))
        keep("fsdp_resume_2", launch(args, "fsdp_resume_2", "resume", large, 2, "--with_optimizer", "--train_after"))
        # one process holds the whole model: with AdamW and a step (16 bytes a parameter) where memory allows
        whole = params[large]
        if mem_available() > 16 * whole + 3 * GiB:
            extra = ["--with_optimizer", "--train_after"]
        elif mem_available() > 12 * whole + 2 * GiB:
            extra = ["--with_optimizer"]
        else:
            extra = []
        keep("resume_1", launch(args, "resume_1", "resume", large, 1, *extra))
        keep("fsdp_train_offload", launch(args, "fsdp_train_offload", "train", large, 2, "--offload"))
        shutil.rmtree(os.path.join(args.out_dir, f"ckpt-{large}.dcp"), ignore_errors=True)

    if args.only in (None, "ddp"):
        keep("ddp_124M", launch(args, "ddp_124M", "ddp", "124M", 2))

    if args.only in (None, "times"):
        for size in args.time_sizes.split(","):
            # an asynchronous save copies each process's parameters and moments (12 bytes a parameter in all)
            # while they are also held for training (16 bytes a parameter with gradients)
            need = 28 * params[size] + 2 * GiB
            extra = ["--asynchronous"] if mem_available() > need else []
            records = launch(args, f"times_save_{size}", "times_save", size, 2, *extra)
            if not extra:
                for r in records:
                    r["async_skipped"] = f"needs about {need / GiB:.1f} GiB, {mem_available() / GiB:.1f} available"
            keep(f"times_save_{size}", records)
            keep(f"times_load_{size}", launch(args, f"times_load_{size}", "times_load", size, 2))
            shutil.rmtree(os.path.join(args.out_dir, f"ckpt-{size}.dcp"), ignore_errors=True)
    print_tables(results)


def print_tables(results):
    params = results["params"]
    gib = lambda b: f"{b / GiB:.2f}"
    print("\n| run | processes | peak RSS per rank (GiB) | step (s) | save (s) | load (s) | checkpoint (GiB) |")
    print("|---|---|---|---|---|---|---|")
    large = results["fsdp_train"][0]["size"] if "fsdp_train" in results else ""
    for name, label in [("fsdp_train", f"FSDP, GPT-2 {large}"), ("fsdp_train_offload", "FSDP + fsdp_cpu_offload"),
                        ("fsdp_resume_2", "resume on 2 (FSDP) + 1 step"), ("resume_1", "resume on 1 process")]:
        if name not in results:
            continue
        rs = results[name]
        steps = [s for r in rs for s in r.get("step_s", [])[1:] or r.get("step_s", [])]
        what = label
        if name == "resume_1":
            r = rs[0]
            what += (" + 1 step" if r.get("step_s") else "") + ("" if r.get("with_optimizer") else " (weights only)") \
                + (", with AdamW state" if r.get("with_optimizer") else "")
        print(f"| {what} | {len(rs)} | {' / '.join(gib(r['peak_rss']) for r in rs)} | "
              f"{(sum(steps) / len(steps)) if steps else float('nan'):.1f} | "
              f"{max(r.get('save_s', float('nan')) for r in rs):.1f} | {max(r.get('load_s', float('nan')) for r in rs):.1f} | "
              f"{gib(rs[0]['checkpoint_bytes']) if rs[0].get('checkpoint_bytes') else ''} |")
    if "ddp_124M" in results:
        rs = results["ddp_124M"]
        n = params["124M"]
        beyond = max(r["peak_rss"] - 16 * n for r in rs)  # interpreter, torch, activations, DDP's buckets
        need = 16 * params["774M"] + beyond
        print(f"| DDP, GPT-2 small 124M (measured) | 2 | {' / '.join(gib(r['peak_rss']) for r in rs)} | "
              f"{sum(s for r in rs for s in r['step_s'][1:]) / max(1, sum(len(r['step_s'][1:]) for r in rs)):.1f} | | | |")
        print(f"| DDP, GPT-2 large 774M (computed: 16 B x {params['774M'] / 1e6:.0f}M + {gib(beyond)} GiB measured "
              f"beyond the state at 124M) | 2 | {gib(need)} each, {gib(2 * need)} in all | | | | |")
    print("\n| model | checkpoint (GiB) | sync save: loop blocked (s) | async save: loop blocked (s) | "
          "async: written after (s) | steps trained meanwhile | load (s) |")
    print("|---|---|---|---|---|---|---|")
    if "fsdp_train" in results and "fsdp_resume_2" in results:
        rs, ls = results["fsdp_train"], results["fsdp_resume_2"]
        size = rs[0]["size"]
        need = 28 * params[size] + 2 * GiB
        print(f"| {size} | {gib(rs[0]['checkpoint_bytes'])} | {max(r['save_s'] for r in rs):.1f} | not run: an asynchronous "
              f"save holds a second copy of each process's parameters and moments, about {need / GiB:.0f} GiB in all "
              f"with training's | | | {max(r['load_s'] for r in ls):.1f} |")
    for size in SIZES:
        if f"times_save_{size}" not in results:
            continue
        rs, ls = results[f"times_save_{size}"], results[f"times_load_{size}"]
        r0 = rs[0]
        if "async_blocked_s" in r0:
            blocked = f"{max(r['async_blocked_s'] for r in rs):.2f}"
            total = f"{max(r['async_total_s'] for r in rs):.1f}"
            during = str(r0["async_steps_during"])
        else:
            blocked = total = during = f"not run ({r0.get('async_skipped', '')})"
        print(f"| {size} | {gib(r0['checkpoint_bytes'])} | {max(r['sync_save_s'] for r in rs):.1f} | {blocked} | "
              f"{total} | {during} | {max(r['load_s'] for r in ls):.1f} |")


if __name__ == "__main__":
    main()
