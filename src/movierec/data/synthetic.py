"""A deterministic, MovieLens-shaped synthetic dataset with real sequential structure.

It exists so that the system runs anywhere with no download; real results need a MovieLens release.
Items fall into taste clusters, each cluster ordered as a chain ("sequels"); item popularity is Zipf.
Each user belongs to one cluster and mostly moves along its chain (the next item depends on the previous
one), sometimes picks a popular item of the cluster, and rarely a popular item of any cluster. A
sequential model can learn the chains; a popularity ranking cannot.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from movierec.data.split import Interactions

GENRES = (
    "Action",
    "Comedy",
    "Drama",
    "Horror",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "Animation",
    "Western",
    "Documentary",
    "Musical",
    "Crime",
)


def generate_synthetic(
    seed: int = 0, num_users: int = 3000, num_items: int = 1500, num_clusters: int = 12
) -> tuple[Interactions, pa.Table]:
    """Return (interactions, titles) for `num_users` users and `num_items` items, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    item_ids = np.arange(1, num_items + 1)
    cluster_of = rng.permutation(np.arange(num_items) % num_clusters)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.9
    popularity = popularity[rng.permutation(num_items)]
    chains = [rng.permutation(np.flatnonzero(cluster_of == c)) for c in range(num_clusters)]
    position = np.empty(num_items, dtype=np.int64)
    for chain in chains:
        position[chain] = np.arange(len(chain))
    cluster_probs = [popularity[chain] / popularity[chain].sum() for chain in chains]
    global_probs = popularity / popularity.sum()

    lengths = np.clip(rng.lognormal(3.4, 0.7, num_users).astype(int), 5, 400)
    users, items, times = [], [], []
    for user in range(num_users):
        c = int(rng.integers(num_clusters))
        chain, probs = chains[c], cluster_probs[c]
        n = min(int(lengths[user]), len(chain))
        seen: set[int] = set()
        current = int(rng.choice(chain, p=probs))
        draws = rng.random(n * 4)
        steps = rng.integers(1, 3, n * 4)
        picks_cluster = rng.choice(chain, size=n * 4, p=probs)
        picks_global = rng.choice(num_items, size=n * 4, p=global_probs)
        seq = []
        k = 0
        while len(seq) < n and k < n * 4:
            if current not in seen:
                seen.add(current)
                seq.append(current)
            r = draws[k]
            if r < 0.7:
                current = int(chain[(position[current] + steps[k]) % len(chain)])
            elif r < 0.93:
                current = int(picks_cluster[k])
            else:
                current = int(picks_global[k])
            k += 1
        start = int(rng.integers(946_684_800, 1_400_000_000))
        gaps = rng.integers(30, 86_400 * 3, len(seq))
        users.append(np.full(len(seq), user + 1))
        items.append(item_ids[np.asarray(seq)])
        times.append(start + np.cumsum(gaps))
    users_arr = np.concatenate(users).astype(np.int64)
    interactions = Interactions(
        users=users_arr,
        items=np.concatenate(items).astype(np.int64),
        timestamps=np.concatenate(times).astype(np.int64),
        ratings=rng.integers(1, 6, len(users_arr)).astype(np.float32),
    )
    years = 1950 + rng.integers(0, 70, num_items)
    titles = pa.table(
        {
            "movie_id": item_ids.astype(np.int64),
            "title": [f"Synthetic movie {i} ({y})" for i, y in zip(item_ids, years, strict=True)],
            "year": years.astype(np.int32),
            "genres": [GENRES[c % len(GENRES)] for c in cluster_of],
        }
    )
    return interactions, titles
