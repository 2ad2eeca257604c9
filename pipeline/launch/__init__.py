"""Where this process is in a distributed job (env.py), the deepspeed hostfile of a Slurm allocation
(hostfile.py, `deberta-ds hostfile`) and a smoke test of a launch (check.py, `deberta-ds launch check`, on a
rendezvous with a deadline: rendezvous.py)."""
