"""Export of a data-parallel (or expert-parallel) run: a stage's replicas replay together.

Gradients were averaged over a stage's replicas (an expert's over the replicas holding it), so no
replica can replay alone: each replica replays its own window from its own pipeline neighbours'
persisted logs in a forked process, all in one gloo group with the run's expert-parallel groups,
the all-to-all live. The stage's dense state is then gathered: replicated parameters from replica 0,
each expert from the one rank of the first expert-parallel group that holds it, under the
unsharded model's keys; an expert missing or held twice is refused, naming its layer and index.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moetion import env
from moetion import tensor_tree
from moetion.config import Config
from moetion.distributed import new_expert_groups
from moetion.errors import MoetionError
from moetion.expert_parallel import ExpertShard
from moetion.launcher import run_workers
from moetion.module import PipelineModule
from moetion.moe import MoELayer
from moetion.replay import persisted_neighbour_logs, replay_stage
from moetion.snapshot.persist import load_persisted
from moetion.topology import PipeTopology


def replay_replicas(run_dir: Path, *, job, config: Config, stage: int, start: int, replicas: int, ep_size: int,
                    out_dir: Path) -> tuple[list[dict], list[str]]:
    """Replays every replica of ``stage`` together; returns (each replica's state, error messages)."""
    results = run_workers(_replay_replica, nproc=replicas, args=(run_dir, job, config, stage, start, ep_size, out_dir))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return [], errors
    return [tensor_tree.decode(Path(r["path"]).read_bytes(), source=r["path"]) for r in results], []


def held_experts(job, *, stage: int, shard: ExpertShard) -> str:
    """Which experts of which layers of ``stage`` the expert rank ``shard`` holds, for messages."""
    _, experts = _unsharded(job, stage)
    return "; ".join(f"experts {list(shard.local_experts(count))} of layer {name}" for name, count in experts.items())


def gather_stage(parts: list[dict], *, job, stage: int, ep_size: int) -> dict[str, torch.Tensor]:
    """The unsharded stage's state dict from its replicas' (raises MoetionError naming what is wrong)."""
    whole, experts = _unsharded(job, stage)
    group = parts[:ep_size]  # the first expert-parallel group holds every expert once
    model: dict[str, torch.Tensor] = {}
    for key in whole.state_dict():
        owner = _expert_of(key, experts)
        if owner is None:
            model[key] = group[0][key]
            continue
        holders = [r for r, part in enumerate(group) if key in part]
        layer, expert = owner
        if not holders:
            raise MoetionError(f"stage {stage}: expert {expert} of layer {layer} is missing ({key} is in no replica's "
                               f"state of expert-parallel group 0)")
        if len(holders) > 1:
            raise MoetionError(f"stage {stage}: expert {expert} of layer {layer} is present twice (replicas {holders} "
                               "both hold it): the run's expert placement is inconsistent")
        model[key] = group[holders[0]][key]
    unknown = sorted({k for part in group for k in part} - set(model))
    if unknown:
        raise MoetionError(f"stage {stage}: the replicas hold {unknown[:3]} that the model definition lacks")
    return model


def _unsharded(job, stage: int) -> tuple[PipelineModule, dict[str, int]]:
    """The stage as built without expert parallelism (on the meta device), and its MoE layers' sizes."""
    with torch.device("meta"):
        whole = PipelineModule(job.layers, job.num_stages, loss_fn=job.loss_fn, partition_method=job.partition_method,
                               stage_id=stage, seed=job.module_seed)
    return whole, {name: layer.num_experts for name, layer in whole.named_modules() if isinstance(layer, MoELayer)}


def _expert_of(key: str, experts: dict[str, int]) -> tuple[str, int] | None:
    layer, sep, rest = key.rpartition(".experts.")
    if not sep or layer not in experts:
        return None
    return layer, int(rest.split(".", 1)[0])


def _replay_replica(run_dir: Path, job, config: Config, stage: int, start: int, ep_size: int, out_dir: Path) -> dict:
    where = env.rank_env()
    replica, replicas = where.rank, where.world_size
    torch.set_num_threads(1)  # replay sets the run's own thread count
    dist.init_process_group("gloo", init_method="env://")
    try:
        expert_group, expert_data_group = new_expert_groups(
            PipeTopology(num_stages=1, data_parallel=replicas, expert_parallel=ep_size), replica)
        module = PipelineModule(job.layers, job.num_stages, loss_fn=job.loss_fn, partition_method=job.partition_method,
                                stage_id=stage, seed=job.module_seed, ep_size=ep_size, expert_rank=replica % ep_size)
        optimizer = job.optimizer(module.parameters())
        window = load_persisted(run_dir, stage=stage, replica=replica, iteration=start)
        with persisted_neighbour_logs(run_dir, module=module, start_iteration=start, replica=replica) as logs:
            replay_stage(module=module, optimizer=optimizer, config=config, window=window, logs=logs, data=job.data,
                         until=window.manifest.end_iteration, replica_group=dist.group.WORLD,
                         expert_group=expert_group, expert_data_group=expert_data_group)
        path = out_dir / f"stage-{stage:03d}-replica-{replica:03d}.tree"
        path.write_bytes(tensor_tree.encode(module.state_dict()))
        return {"path": str(path)}
    except MoetionError as error:
        return {"error": f"stage {stage}, replica {replica}: {error}"}
    finally:
        dist.destroy_process_group()
