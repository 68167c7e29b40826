"""nbgrader configuration for a minialign course (copied into COURSE/ by `python -m minialign.course nbgrader-source`;
nbgrader reads it there, it is not imported by the library).

- Execute.timeout: nbgrader stops a cell after 30 s by default; the notebooks' heavier cells (training in the class
  profile) take longer, so a cell gets 600 s (an autograde of one class-profile notebook takes minutes).
- GenerateAssignment: nbgrader's own preprocessors, after removing the cells tagged `answer-key` (the answers to
  "Check your understanding", kept in the instructor's source) so that they never reach the release.
- The kernel as minialign.kit.kernel runs it: IPC sockets in a fresh temporary folder (no unencrypted TCP port), and
  nbclient's ipywidgets Output handler off (its comm messages on the shell channel lost a cell's reply: an autograde
  of notebook 07 waited forever once, kernel and nbgrader both idle; `interact` outputs land in the cell instead).
"""
import tempfile

from nbconvert.preprocessors import TagRemovePreprocessor
from nbgrader.converters import GenerateAssignment

from minialign.kit.kernel import kernel_options, no_widget_sync

c = get_config()  # noqa: F821  (nbgrader defines get_config when it reads this file)

c.CourseDirectory.course_id = "minialign"
c.Execute.timeout = 600
c.TagRemovePreprocessor.enabled = True
c.TagRemovePreprocessor.remove_cell_tags = ["answer-key"]
c.GenerateAssignment.preprocessors = [TagRemovePreprocessor] + GenerateAssignment.class_traits()["preprocessors"].default()

c.merge(kernel_options(tempfile.mkdtemp(prefix="minialign-nbgrader-")).get("config", {}))
no_widget_sync().__enter__()  # for the whole nbgrader process that reads this file: never restored
