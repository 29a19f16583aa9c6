"""``make demo``: the whole promise of onebit on the bundled digits, in one run.

1. train a binary LeNet (float stem and classifier, binary convs and hidden layer);
2. draw its training curves and binarized weights (PNG);
3. pack it with the bit-packed engine, save the packed file, load it back, check
   that its test-set predictions equal the simulated model's, and print the file
   sizes and the measured speed of both.
"""

from __future__ import annotations

import os

from rich.console import Console

from onebit.train import TrainConfig, Trainer

__all__ = ["run"]


def run(out: str = "runs/demo", epochs: int = 20, console: Console | None = None) -> dict:
    console = console or Console()
    trainer = Trainer.from_config(TrainConfig(model="lenet_binary", data="digits", epochs=epochs, out=out), console)
    trainer.fit()
    _, accuracy = trainer.evaluate()
    console.print(f"\n[bold]test accuracy[/] {accuracy:.2%}  (run saved to {out}/)", highlight=False)

    from onebit import plot

    model = trainer.model.eval()
    curves = plot.training_curves(os.path.join(out, "history.csv"), os.path.join(out, "curves.png"))
    layer = plot.binary_layers(model)[0]
    weights = plot.binary_weights(model, layer, path=os.path.join(out, "weights.png"))
    del curves, weights
    console.print(
        f"pictures: {out}/curves.png (training curves), {out}/weights.png (binary weights of layer {layer})\n"
    )

    from onebit.engine.bench import demo_report

    x_test = trainer.data.test.tensors[0]
    report = demo_report(model, x_test, out, console)
    if report["mismatches"]:
        raise RuntimeError(f"packed model disagrees with the simulated model on {report['mismatches']} test images")
    return {"accuracy": accuracy, "trainer": trainer, "engine": report}
