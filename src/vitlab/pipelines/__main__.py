"""`python -m vitlab.pipelines`: the registered pipelines and what each can do."""

from vitlab.pipelines import ACTIONS, PIPELINES, load

for name in PIPELINES:
    pipeline = load(name)
    print(f"{name:14s}", " ".join(a for a in ACTIONS if getattr(pipeline, a) is not None))
