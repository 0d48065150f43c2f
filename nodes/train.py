"""ZImageTurboTrainLora (placeholder until the trainer API lands)."""
from comfy_api.latest import io


class ZImageTurboTrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="ZImageTurboTrainLora", display_name="Z-Image Turbo Train LoRA", category="ZImageTurbo",
                         description="placeholder", is_experimental=True, inputs=[], outputs=[])

    @classmethod
    def execute(cls):
        raise NotImplementedError
