"""``make demo``: train a binary LeNet on the bundled digits and show what onebit gives."""

from __future__ import annotations

from rich.console import Console

from onebit.train import TrainConfig, Trainer

__all__ = ["run"]


def run(out: str = "runs/demo", epochs: int = 20, console: Console | None = None) -> dict:
    console = console or Console()
    trainer = Trainer(TrainConfig(model="lenet_binary", data="digits", epochs=epochs, out=out), console)
    trainer.fit()
    _, accuracy = trainer.evaluate()
    console.print(f"\n[bold]test accuracy[/] {accuracy:.2%}  (run saved to {out}/)", highlight=False)
    return {"accuracy": accuracy, "trainer": trainer}
