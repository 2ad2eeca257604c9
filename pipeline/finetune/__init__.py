"""SuperGLUE fine-tuning: typed settings and presets, the tasks (formats, labels, metrics), features and
submissions, SiFT, inference, `deberta-ds finetune` and `deberta-ds predict`."""
