# slurm/common.sh: helpers shared by the sbatch templates (sourced; nothing to edit here).
#
# DRY_RUN=1 makes a template print its resolved commands (shell-quoted, one per line,
# prefixed with "+ ") instead of running them: that is how tests render the templates
# without a cluster, and how you check a submission before spending an allocation:
#   DRY_RUN=1 SLURM_JOB_ID=1 SLURM_JOB_NODELIST=localhost bash slurm/train.sbatch CONFIG.yaml

# `python -m trainer` / `python -m data_prep` from the checkout, whatever the working
# directory: jobs run where sbatch was called, so relative paths in arguments and
# configs mean what they meant at submission.
export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}

# One line per attempt: a requeued job appends to the same log (--open-mode=append),
# so these lines are how you tell the attempts apart.
slurm_banner() {
    local what=$1 task=""
    [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] && task=" array task $SLURM_ARRAY_TASK_ID"
    echo "=== $what: job ${SLURM_JOB_ID:-none}$task attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 ))" \
         "on ${SLURM_JOB_NODELIST:-$(hostname)} at $(date '+%F %T') ==="
}

# Print a command as it would run (for DRY_RUN and for the log).
show_cmd() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
}

is_dry_run() { [[ ${DRY_RUN:-0} == 1 ]]; }

# Run a command, or only show it under DRY_RUN=1.
run() {
    show_cmd "$@"
    is_dry_run || "$@"
}

# GPUs allocated on this node: SLURM's own count, else the visible devices, else 0.
gpus_on_node() {
    local n=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    n=${n##*:}                      # "a100:4" -> "4"
    if [[ -z $n && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local -a devs
        IFS=, read -r -a devs <<<"$CUDA_VISIBLE_DEVICES"
        n=${#devs[@]}
    fi
    echo "${n:-0}"
}

# Rendezvous and accelerator for ranks started by srun (one task per GPU).
#   MASTER_ADDR: the job's first node, which runs rank 0 (srun's default block distribution).
#   MASTER_PORT: derived from the job id, so jobs sharing a node do not collide, plus the
#                restart count, so a requeued attempt never meets its predecessor's socket.
#                Range 10000-29999: below Linux's ephemeral ports (32768+).
slurm_dist_env() {
    # sbatch exports the submitting shell's environment: a RANK or WORLD_SIZE left there (a
    # torchrun shell, a notebook that started a process group) would override srun's task ids
    # and make every task rank 0 of its own world.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_PORT=$(( 10000 + (SLURM_JOB_ID % 1000) * 20 + ${SLURM_RESTART_COUNT:-0} % 20 ))
    export MASTER_ADDR MASTER_PORT
    GPUS_PER_NODE=$(gpus_on_node)
    if [[ $GPUS_PER_NODE == 0 ]]; then
        # No GPU (e.g. the local test cluster): DeepSpeed's CPU accelerator with gloo.
        export DS_ACCELERATOR=cpu
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    fi
    echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT GPUS_PER_NODE=$GPUS_PER_NODE" \
         "NTASKS=${SLURM_NTASKS:-?} DS_ACCELERATOR=${DS_ACCELERATOR:-auto}"
}
