#!/usr/bin/env bash
# bench/gpu.py on a bare, offline GPU machine whose python3 (3.12, x86-64) has torch and torchvision but
# not the rest of what `hivetrain run` imports.
#
#   bash bench/gpu.sh --download    here, where PyPI is reachable: those wheels into .whl/ (git-ignored)
#   bash bench/gpu.sh [ARGS...]     there: install .whl/ into /tmp/site, then python3 bench/gpu.py ARGS
#
# That python3 already has numpy, Pillow, click, tqdm, scipy, PyYAML, msgpack, uvloop, sortedcontainers,
# packaging, idna and six. Carried: webdataset, hivemind (its wheel holds the p2pd binary) and their
# needs, at the versions the project's venv runs; protobuf and typing-extensions too, as hivemind's
# generated code and pydantic need recent ones. libtorrent is not needed: a peer reads local shards in
# place. One version of each name: two would stop the install.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    webdataset==1.0.2 braceexpand==0.1.7
    hivemind==1.1.12 configargparse==1.9.0 base58==2.1.1 netaddr==1.3.0 py-cid==0.5.0 py-multibase==2.0.0
    py-multicodec==1.0.0 py-multihash==3.0.0 morphys==1.0 blake3==1.0.11 mmh3==5.3.1
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 protobuf==7.36.2
)
# Published as source only; pure Python, so wheels built here install there.
SOURCE_ONLY=(prefetch_generator==1.0.3 varint==1.0.2 python-baseconv==1.2.2)

if [[ "${1:-}" == --download ]]; then
    rm -rf .whl && mkdir .whl
    platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
        platforms+=(--platform "${p}_x86_64")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
    python3 -m pip wheel -q --no-deps -w .whl "${SOURCE_ONLY[@]}"
    echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/: carry [\".whl\"] to the device"
    exit 0
fi

if compgen -G '.whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c 'import sys, torch, torchvision, hivemind, webdataset, pydantic
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"hivemind {hivemind.__version__}, cuda {torch.cuda.is_available()}")' || {
    echo "bench/gpu.sh: packages missing (above); run 'bash bench/gpu.sh --download' here and carry .whl" >&2
    exit 1
}
exec python3 bench/gpu.py "$@"
