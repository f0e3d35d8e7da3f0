"""``finetune.model_spec``: the model side of a task, which a run opened for generation builds without Lightning."""

from finetune.model_spec import GENERATING_TASKS, ModelSpec
from finetune.runs import GENERATING
from finetune.tasks import TASKS


def test_generating_tasks_name_every_generating_task_with_its_objective_and_auto_class():
    generating = {path: cls for path, cls in TASKS.items() if cls.auto_class in GENERATING}
    assert sorted(GENERATING_TASKS) == sorted(generating)
    for path, cls in generating.items():
        assert GENERATING_TASKS[path] == (cls.objective, cls.auto_class), path
        # Their model is built by ModelSpec's own code, which a GeneratingSpec runs without the task class.
        assert cls.build_model is ModelSpec.build_model and cls.model_overrides is ModelSpec.model_overrides, path
