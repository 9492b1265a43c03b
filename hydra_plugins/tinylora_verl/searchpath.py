"""Make ``+recipe=tinylora_*`` resolvable from an installed wheel, for verl's unchanged ``main_ppo``."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

CONFIG_MODULE = "pkg://tinylora_verl.hydra_configs"


class TinyLoRASearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Appended: verl's own config groups keep precedence; ours only adds the `recipe` group.
        search_path.append(provider="tinylora-verl", path=CONFIG_MODULE)
