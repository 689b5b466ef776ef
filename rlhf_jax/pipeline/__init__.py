"""The RLHF pipeline (being split into config / run / stages / evaluate)."""
from rlhf_jax.pipeline.legacy import *  # noqa: F401,F403
from rlhf_jax.pipeline.legacy import (STAGES, DataConfig, DPOStageConfig, EvalConfig,  # noqa: F401
                                      PipelineConfig, PolicyConfig, PPOStageConfig, RMStageConfig,
                                      SFTStageConfig, StagePreempted, load_final, run_pipeline,
                                      save_final)
