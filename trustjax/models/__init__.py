"""Flax Linen models and their task heads."""

from trustjax.models.classifiers import (BagOfEmbeddings, EncoderBlock, MLPClassifier,
                                         TransformerClassifier, build_classifier,
                                         class_metrics, classification_loss, classification_metrics,
                                         embed_with_positions)
from trustjax.models.language import (CharLSTM, GPTDecoder, LSTMLayer, build_language_model,
                                      generate, lm_loss, lm_metrics)
from trustjax.models.bert import (LORA_TARGETS, BertAttention, BertClassifier, BertConfig,
                                  BertEncoder, PretrainedTokenizer, SentenceEncoder,
                                  convert_hf_bert, load_bert, mean_pool, minilm_path,
                                  read_checkpoint)
