"""``rotation``: how well each expert predicts the rotation of the target images (no labels).

Every expert was trained on its cluster to tell whether an image was turned by 0, 90, 180
or 270 degrees. Its accuracy at that on the target images (each image seen at all four
angles) is its score: an expert that learned the target's kind of images recognises their
upright orientation (Yan et al., 2020; the deployed NDS client's score).
"""

from __future__ import annotations

from nds_client.inference import forward
from nds_client.methods.base import MethodScores, ScoringMethod, ScoringRun, count_labels, expert_entry


class RotationMethod(ScoringMethod):
    name = "rotation"

    def score(self, run: ScoringRun) -> MethodScores:
        runners = run.sessions.runners(run.experts)
        decoded = run.decode([r.input_size for r in runners])
        n = len(decoded)
        ran = forward(runners, decoded, rotate=True, batch_size=run.batch_size, keep_features=False, keep_logits=False,
                      progress=run.progress, stage="score")
        entries = []
        for r in runners:
            correct = ran[r.expert.id]["correct"]
            details = {"by_rotation": [round(float(v), 4) for v in correct / n]}
            entries.append(expert_entry(r.expert, float(correct.sum() / (4 * n)), accuracy=True, details=details))
        labels = count_labels(decoded.labels) if decoded.labels is not None else None
        return MethodScores(decoded=decoded, entries=entries, providers=[r.provider for r in runners], labels=labels)
