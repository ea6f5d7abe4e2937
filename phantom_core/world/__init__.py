"""The miniature subject-to-video world: a deterministic generator of Phantom triplets with known ground truth, and
the metrics that measure a model in it (docs/WORLD.md).

    grammar    prompt <-> Scene                    subjects  the pool (emoji, photo, shape) and the held-out rule
    render     physics, video + ground truth       pairs     cross-pair and in-pair reference images
    sample     make_sample(split, seed, index)     dataset   WorldDataset (tensors) and the on-disk JSONL format
    corpus     a tokenizer corpus for the world    tracking  template matching (NCC) of a subject in every frame
    metrics    score_video (every metric)          cases     the fixed evaluation case set
    baselines  paste / truth / noise / a model     evaluate  summaries and the table; sheet: the contact sheet
    cli        `python -m phantom_core evaluate`
    clip_model the world's tiny CLIP (open_clip)   mmdit_default  the recipe of the world MMDiT (paper's network)
"""
