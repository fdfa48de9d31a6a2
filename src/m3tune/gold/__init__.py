"""The maintainer's gold builder: writes the packaged gold files (m3tune/evaluation/data/) from the corpus and the
hand-written sources in the checkout's gold/ folder.

build     gold v3 (`python -m m3tune.gold.build --corpus PASSAGES`)
build_v4  gold v4, its pools and the writer's checks (`python -m m3tune.gold.build_v4 build --corpus PASSAGES`)

Not part of the runtime, and left out of the wheel: it needs a checkout (gold/v4/), and the runtime only reads
the files it wrote (m3tune.evaluation.gold). tests/test_gold.py and tests/test_gold_v4.py rebuild those files
from it byte for byte.
"""
