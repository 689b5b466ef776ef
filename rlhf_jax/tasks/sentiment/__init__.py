"""The sentiment task (human ratings of Hutto & Gilbert 2014, judged by VADER)."""
