"""Task functions of the tiny local lmms-eval tasks used by tests/test_mfpruner_eval.py."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    prediction = results[0].strip().lower()
    return {"accuracy": float(prediction == doc["answer"].strip().lower())}
