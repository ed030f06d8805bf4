# ============================================================================
# slurm/env.sh: THE environment setup for every template (prep, merge, train, eval).
# EDIT this file for your site: module loads, the Python environment, site variables.
# It is sourced by the batch shell before any srun, so srun tasks inherit it.
# ============================================================================

# --- EDIT: site modules (examples; leave commented on a machine without modules) ---
# module purge
# module load cuda/12.4 nccl/2.21

# --- EDIT: Python environment (a venv, or `conda activate NAME`) ---
VENV=${VENV:-$REPO_DIR/.venv}
if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
else
    echo "warning: no venv at $VENV (set VENV=... or edit slurm/env.sh); using $(command -v python || echo 'no python')" >&2
fi

# --- Defaults that suit every site ---
export PYTHONUNBUFFERED=1          # logs reach the job's output file as they are written
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # compute nodes usually have no internet
# A crashed rank makes the others fail fast instead of hanging until the job's time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# EDIT if needed: network interface for NCCL/gloo on multi-homed nodes.
# export NCCL_SOCKET_IFNAME=ib0
# export GLOO_SOCKET_IFNAME=ib0
