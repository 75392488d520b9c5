"""MFPruner models in lmms-eval (EvolvingLMMs-Lab/lmms-eval 0.7).

lmms-eval 0.7 builds its model registry from `ModelManifest`s, including those published
through the `lmms_eval.models` entry-point group (the legacy `@register_model` decorator does
not reach that registry). This project's pyproject.toml publishes `manifests` there, so once the
project is installed (`pip install -e .[eval]`) the stock CLI knows `--model mfpruner`:

    lmms-eval eval --model mfpruner --model_args pretrained=PATH_OR_ID,visual_token_budget=64 --tasks pope,mme

`--model mfpruner` resolves to the chat class (lmms-eval's default for models that have one);
`--force_simple` selects the simple class, which also implements `loglikelihood`
(multiple-choice tasks). The adapter lives in `mfpruner_eval.model`; this module stays light
because lmms-eval imports it while it builds its registry.
"""

MODEL_ID = "mfpruner"
SIMPLE_CLASS_PATH = "mfpruner_eval.model.MFPrunerLMM"
CHAT_CLASS_PATH = "mfpruner_eval.model.MFPrunerChatLMM"


def manifests():
    """The `lmms_eval.models` entry point (lmms-eval calls it while it builds its registry).

    A function, not a module-level ModelManifest: importing lmms_eval.models.registry_v2 here
    would run lmms_eval.models' registry set-up, which loads this entry point again while this
    module is half imported, and lmms-eval would drop the model with a logged warning."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS_PATH, chat_class_path=CHAT_CLASS_PATH)]
