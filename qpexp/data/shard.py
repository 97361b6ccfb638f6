"""A training loader's share for this rank under DDP (the trainer's ``world_size``/``global_rank``)."""

from __future__ import annotations


class RankShard:
    """A training loader's share for this rank: batch ``i`` goes to rank ``i % world``; every rank gets
    ``ceil(len / world)`` batches (positions past the end wrap to the epoch's first, as DistributedSampler pads),
    so that DDP ranks step in lockstep. ``sampler.set_epoch`` passes through."""

    def __init__(self, loader, world: int, rank: int):
        self.loader, self.world, self.rank = loader, world, rank
        self.sampler = getattr(loader, "sampler", None)
        self.batch_sampler = None

    def __len__(self) -> int:
        return -(-len(self.loader) // self.world)

    def __iter__(self):
        n, seen, first = len(self), 0, []
        for i, b in enumerate(self.loader):
            if i < self.world:
                first.append(b)
            if i % self.world == self.rank:
                seen += 1
                yield b
        total = len(self.loader)
        for k in range(seen, n):  # DistributedSampler's padding: position rank + world k, wrapped
            yield first[(self.rank + self.world * k) % total]


def shard_train_loader(loader, trainer):
    """``loader`` as this rank's :class:`RankShard` when ``trainer`` runs DDP over several processes
    (unless ``use_distributed_sampler=False``); ``loader`` itself otherwise."""
    if trainer is None or getattr(trainer, "world_size", 1) <= 1:
        return loader
    if not getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True):
        return loader
    return RankShard(loader, trainer.world_size, trainer.global_rank)
