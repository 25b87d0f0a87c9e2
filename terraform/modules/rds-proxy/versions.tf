terraform {
  # Write-only arguments (secret_string_wo) and ephemeral resources need Terraform 1.11;
  # aws_region.region (the region attribute) needs the AWS provider 6.
  required_version = ">= 1.11"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.7"
    }
  }
}
