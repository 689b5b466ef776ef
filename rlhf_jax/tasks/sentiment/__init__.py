"""The sentiment task: human ratings of Hutto & Gilbert 2014 (``ratings``: fetch, parse,
split), the records derived from them (``records``), and the task with its VADER judge
(``task``)."""
