#!/usr/bin/env python3
"""Times the ORIGINAL EfficientMORL code (github.com/pemami4911/EfficientMORL) on this machine's
CPU (or, with --device cuda, a GPU), the way its train.py / eval.py run it, so that emorl's benchmark can compare the two programs
on the same machine (`npm run bench -- step --original DIR` calls this script).

Set-up (Debian; PyPI is not needed):
    apt-get install -y python3-torch python3-numpy python3-scipy python3-h5py
    git clone https://github.com/pemami4911/EfficientMORL   # or any copy of it
    /usr/bin/python3 bench/original.py --repo EfficientMORL --mode train --steps 5

The original's files are imported as they are. Two of its imports are not on Debian and are
stood in for here: `sacred` (its model constructors take their arguments from the config through
`@net.capture`: the stand-in fills them from the `@net.config` defaults overlaid with the JSON's
"Net" section, as sacred does) and `warmup_scheduler` (the learning-rate schedule is set directly:
linear warm-up over `warmup` steps, then 0.5 ** (steps / 100000)). The model runs on the CPU
without DistributedDataParallel; no logging or checkpoints.

A training step is train.py's loop body: refinement curriculum, zero_grad, forward with the loss,
backward, schedule, gradient clipping (5.0), Adam, GECO's EMA / beta update. Timed steps start
after GECO's warm start, so they take its constraint path. Inference is eval.py's call: the model
in eval mode with gradients enabled (its refinement differentiates the loss w.r.t. the posterior),
reading out the last stage's means and masks. Images are random uint8 mapped to [-1, 1] as the
original's data loader does. Prints one JSON line.
"""
import argparse
import inspect
import json
import os
import resource
import statistics
import sys
import time
import types


class _Ingredient:
    """What lib/model.py needs of sacred.Ingredient: @config collects defaults, @capture fills them in."""

    def __init__(self, path, ingredients=()):
        self.path = path
        self.cfg = {}

    def config(self, f):
        captured = {}

        def trace(frame, event, arg):
            if event == 'return' and frame.f_code is f.__code__:
                captured.update(frame.f_locals)

        previous = sys.getprofile()
        sys.setprofile(trace)
        try:
            f()
        finally:
            sys.setprofile(previous)
        self.cfg.update(captured)
        return f

    def capture(self, f):
        sig = inspect.signature(f)
        cfg = self.cfg

        def wrapper(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs)
            for name in sig.parameters:
                if name != 'self' and name not in bound.arguments and name in cfg:
                    bound.arguments[name] = cfg[name]
            return f(*bound.args, **bound.kwargs)

        wrapper.__wrapped__ = f
        return wrapper


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--repo', required=True, help='a copy of the original repository')
    ap.add_argument('--config', help="a JSON config (default: the repo's configs/train/tetrominoes/EMORL.json)")
    ap.add_argument('--batch', type=int, help="default: the config's batch size")
    ap.add_argument('--steps', type=int, default=5, help='timed repetitions after one warm-up (default 5)')
    ap.add_argument('--mode', choices=['train', 'infer'], default='train')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--no-ftz', action='store_true', help='keep denormals (slow: the initial weights make many)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda' / 'cuda:N': the model and images there, "
                    'each step timed between device synchronisations')
    a = ap.parse_args()
    repo = os.path.abspath(a.repo)
    config = a.config or os.path.join(repo, 'configs', 'train', 'tetrominoes', 'EMORL.json')

    sacred = types.ModuleType('sacred')
    sacred.Ingredient = _Ingredient
    sys.modules.setdefault('sacred', sacred)
    sys.path.insert(0, repo)
    import torch
    from lib.model import net, EfficientMORL
    from lib.geco import GECO

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(not a.no_ftz)
    torch.manual_seed(a.seed)
    with open(config) as f:
        cfg = json.load(f)
    net.cfg.update(cfg.get('Net', {}))
    # train.py's defaults where the JSON is silent
    tr = {'batch_size': 16, 'use_geco': True, 'geco_reconstruction_target': -23000, 'geco_ema_alpha': 0.99,
          'geco_step_size_acceleration': 1, 'geco_beta_stepsize': 1e-6, 'lr': 3e-4, 'warmup': 10000,
          'use_scheduler': False, 'clip_grad_norm': True, 'kl_beta_init': 1,
          'refinement_curriculum': [(-1, 3), (100000, 1), (200000, 1)]}
    tr.update(cfg.get('training', {}))
    batch = a.batch or tr['batch_size']

    model = EfficientMORL(batch_size=batch, use_geco=tr['use_geco']).to(a.device)
    on_gpu = a.device.startswith('cuda')

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    C, H, W = model.input_size
    geco = GECO(tr['geco_reconstruction_target'] * C * H * W, tr['geco_ema_alpha'], tr['geco_step_size_acceleration']) if tr['use_geco'] else None
    gen = torch.Generator().manual_seed(1234 + a.seed)

    def images():
        return (torch.randint(0, 256, (batch, C, H, W), generator=gen, dtype=torch.uint8).float() / 255. * 2 - 1).to(a.device)

    times = []
    if a.mode == 'train':
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=tr['lr'])
        base = [g['lr'] for g in opt.param_groups]
        step = model.geco_warm_start
        for rep in range(a.steps + 1):
            x = images()
            sync()
            t0 = time.perf_counter()
            for start, iters in reversed(tr['refinement_curriculum']):
                if step >= start:
                    model.refinement_iters = iters
                    break
            opt.zero_grad()
            out = model(x, geco, step, tr['kl_beta_init'])
            out['total_loss'].backward()
            if tr['use_scheduler']:
                w = tr['warmup']
                for g, b in zip(opt.param_groups, base):
                    g['lr'] = b * step / w if step <= w else b * 0.5 ** ((step - w) / 100000)
            if tr['clip_grad_norm']:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.)
            opt.step()
            if geco is not None:
                if step == model.geco_warm_start:
                    model.geco_C_ema = geco.init_ema(model.geco_C_ema, out['nll'])
                else:
                    model.geco_C_ema = geco.update_ema(model.geco_C_ema, out['nll'])
                    model.geco_beta = geco.step_beta(model.geco_C_ema, model.geco_beta, tr['geco_beta_stepsize'])
            sync()
            dt = time.perf_counter() - t0
            step += 1
            if rep > 0:
                times.append(dt)
    else:
        model.eval()
        last = model.stochastic_layers - 1 + model.refinement_iters
        for rep in range(a.steps + 1):
            x = images()
            sync()
            t0 = time.perf_counter()
            out = model(x, geco, model.geco_warm_start + 1, 1)
            means, masks = out[f'means_{last}'], out[f'masks_{last}'].exp()
            sync()
            dt = time.perf_counter() - t0
            del out, means, masks
            if rep > 0:
                times.append(dt)

    print(json.dumps({'config': config, 'batch': batch, 'mode': a.mode, 'refinement_iters': model.refinement_iters,
                      'median_s': statistics.median(times), 'times_s': times,
                      'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      'torch': torch.__version__, 'threads': torch.get_num_threads(), 'ftz': not a.no_ftz, 'device': a.device}))


if __name__ == '__main__':
    main()
