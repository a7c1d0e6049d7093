"""A Label Studio project as the feedback stage sees it, through the official SDK (`label-studio-sdk`).

`RankingProject` creates (or finds, by title) a project with the ranking interface, imports items it does not
hold yet, and reads back finished rankings with who gave them (the annotating user's email). `play_annotators`
ranks open tasks through the same API as simulated annotator profiles — how the loop is tested offline.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

from components.annotators import AnnotatorProfile
from components.feedback import LABEL_CONFIG, label_studio_task, ranker_result, ranks_from_result


def _field(obj: Any, name: str) -> Any:
    """A field of an SDK model or of a plain dict (annotations come back as dicts inside tasks)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class RankingProject:
    """One Label Studio project holding ranking tasks, found by title or created with LABEL_CONFIG."""

    def __init__(self, url: str, api_key: str, title: str) -> None:
        from label_studio_sdk import LabelStudio

        self.client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key)
        found = [p for p in self.client.projects.list(title=title) if p.title == title]
        self.project = found[0] if found else self.client.projects.create(
            title=title, label_config=LABEL_CONFIG,
            description="alignflow: drag each prompt's responses into order, best first")
        self.id: int = self.project.id

    def tasks(self) -> Iterator[Any]:
        """Every task of the project, with its annotations."""
        return iter(self.client.tasks.list(project=self.id, fields="all", page_size=100))

    def import_items(self, items: Sequence[dict[str, Any]]) -> int:
        """Import the items whose key no task holds yet; returns how many were imported."""
        present = {_field(t, "data").get("item_key") for t in self.tasks()}
        new = [label_studio_task(item) for item in items if item["key"] not in present]
        for start in range(0, len(new), 500):
            self.client.projects.import_tasks(id=self.id, request=new[start:start + 500])
        return len(new)

    def rankings(self, keys: set[str] | None = None) -> list[dict[str, Any]]:
        """Finished rankings (not skipped, a full order) of the tasks whose key is in `keys` (all when None):
        `{key, prompt, responses, ranks, annotator, source}`, one per annotation."""
        emails = {u.id: u.email for u in self.client.users.list()}
        rows = []
        for task in self.tasks():
            data = _field(task, "data")
            if keys is not None and data.get("item_key") not in keys:
                continue
            responses = [entry["body"] for entry in data["items"]]
            for annotation in _field(task, "annotations") or []:
                ranks = ranks_from_result(_field(annotation, "result") or [], len(responses))
                if _field(annotation, "was_cancelled") or ranks is None:
                    continue
                who = _field(annotation, "completed_by")
                rows.append({"key": data["item_key"], "prompt": data["prompt"], "responses": responses,
                             "ranks": ranks, "annotator": emails.get(who, str(who)),
                             "source": f"label-studio:{self.id}/{_field(task, 'id')}"})
        return rows

    def user_id(self, email: str) -> int:
        """The id of the user with `email`, created (no password: API use only) when missing."""
        for user in self.client.users.list():
            if user.email == email:
                return user.id
        return self.client.users.create(username=email.split("@")[0], email=email).id


def play_annotators(project: RankingProject, profiles: Sequence[AnnotatorProfile], seed: int,
                    limit: int | None = None) -> int:
    """Rank every open task (no annotation yet) as the simulated `profiles`, taking turns; each profile is a
    Label Studio user `<name>@annotators.local`. Returns how many tasks were ranked."""
    rng = random.Random(seed)
    users = {p.name: project.user_id(f"{p.name}@annotators.local") for p in profiles}
    turns = itertools.cycle(profiles)
    done = 0
    for task in project.tasks():
        if (_field(task, "annotations") or []) or (limit is not None and done >= limit):
            continue
        profile = next(turns)
        ranks = profile.rank([entry["body"] for entry in _field(task, "data")["items"]], rng)
        project.client.annotations.create(id=_field(task, "id"), result=ranker_result(ranks),
                                          completed_by=users[profile.name])
        done += 1
    return done
